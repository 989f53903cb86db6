"""Load time of a saved compressed checkpoint vs decompose-on-load vs a dense load (SmolLM2).

Run: HF_HUB_OFFLINE=1 python benchmarks/reload.py [--rank 16] [--layers all] [--repeats 3]

Prints one line per ratio (medians over --repeats, all measured in this one run):
  checkpoint_load / decompose_on_load = ...
  checkpoint_load / dense_load = ...
  cache_hit_load / dense_load = ...   (target <= 1.2)
Decompose-on-load runs with the cache off (cache=false), so it measures the decomposition.
The cache-hit load is what a second identical hf-tucker run does: a dense load, then the
factors from the decomposition cache (a private cache folder, primed once, untimed).

On a GPU, with a Llama-2-7B-shaped model of random weights (saved once to --workdir):
  python benchmarks/reload.py --synthetic llama-2-7b --device cuda --dtype bfloat16 --rank 16 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path

import torch
from _synthetic import save_random_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _timing import timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", default="16")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu", help="where the model loads (cuda: straight onto the GPU)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--synthetic", default=None, help="instead of --model: random weights of this shape (e.g. llama-2-7b)")
    ap.add_argument("--synthetic-layers", type=int, default=None, help="keep only the first N decoder layers of --synthetic")
    ap.add_argument("--workdir", default=None, help="where --synthetic saves its model (reused when there)")
    ap.add_argument("--skip-on-load", action="store_true", help="leave decompose-on-load out of the timed rounds (on a big model "
                    "its minutes of solves and memory churn slow the loads timed after it)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.assets import smollm2_path
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint, load_compressed, save_compressed

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.synthetic:
        src = Path(args.workdir or tempfile.mkdtemp(prefix="lowrank-reload-")) / f"{args.synthetic}-random-{args.dtype}-{args.synthetic_layers or 'all'}"
        if not (src / "config.json").exists():
            s = save_random_model(args.synthetic, src, device=args.device, dtype=args.dtype, layers=args.synthetic_layers)
            print(f"# built {src} in {s:.1f} s (random weights)", flush=True)
    else:
        src = Path(args.model) if args.model else smollm2_path()
    spec = {"rank": args.rank, "layers": args.layers, "cache": False}
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def dense() -> object:
        if device.type == "cuda":
            return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, device_map={"": device.index or 0})
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)

    def on_load() -> object:
        m = dense()
        compress_model(m, spec, progress=False)
        return m

    def cache_hit() -> object:
        m = dense()
        rep = compress_model(m, {**spec, "cache": True}, model_id=str(src), progress=False)
        assert rep.cache and rep.cache.get("hit"), f"expected a cache hit, got {rep.cache}"
        return m

    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["LM_EVAL_LOWRANK_CACHE"] = str(Path(tmp) / "cache")  # a private cache, primed below
        primed = dense()
        compress_model(primed, {**spec, "cache": True}, model_id=str(src), progress=False)
        del primed
        model = dense()
        report = compress_model(model, spec, progress=False)
        ck = save_compressed(model, Path(tmp) / "ckpt", report, source={"model_id": str(src)})
        x = torch.randint(0, 1000, (1, 32), device=device)
        with torch.no_grad():
            ref = model(x).logits
        del model

        def from_ckpt() -> object:
            return load_compressed(ck, device=device)

        from_ckpt()  # primed like the cache: its file hash is then known, as on any later reload

        times: dict[str, list[float]] = {"dense": [], "on_load": [], "ckpt": [], "cache": []}
        loads = [("dense", dense), ("on_load", on_load), ("ckpt", from_ckpt), ("cache", cache_hit)]
        if args.skip_on_load:
            del loads[1], times["on_load"]
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all of them alike
            for name, fn in loads:
                box: list[object] = []
                times[name].append(timed(lambda fn=fn: box.append(fn()), device))
                m = box.pop()
                if name in ("ckpt", "cache"):
                    with torch.no_grad():
                        assert torch.equal(m(x).logits, ref), "checkpoint logits differ from decompose-on-load"
                del m
                gc.collect()  # models hold reference cycles: free them here, not inside the next timing
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        med = {k: statistics.median(v) for k, v in times.items()}
        on_load = f"{med['on_load']:.2f}s" if "on_load" in med else "skipped"
        dense_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        ck_bytes = CompressedCheckpoint.open(ck).weight_bytes()
        print(
            f"# model={src.name} device={device} dtype={args.dtype} rank={args.rank} layers={args.layers} modules={len(report.plan.targets)} repeats={args.repeats} "
            f"dense={med['dense']:.2f}s decompose_on_load={on_load} checkpoint={med['ckpt']:.2f}s cache_hit={med['cache']:.2f}s "
            f"bytes ckpt/dense={ck_bytes / dense_bytes:.4f} params after/before={report.params_after / report.params_before:.4f}"
        )
        if "on_load" in med:
            print(f"checkpoint_load / decompose_on_load = {med['ckpt'] / med['on_load']:.3f}")
        print(f"checkpoint_load / dense_load = {med['ckpt'] / med['dense']:.3f}")
        r = med["cache"] / med["dense"]
        print(f"cache_hit_load / dense_load = {r:.3f} (target <= 1.2) {'PASS' if r <= 1.2 else 'FAIL'}")


if __name__ == "__main__":
    main()
