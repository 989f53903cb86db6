"""Load time of a saved compressed checkpoint vs decompose-on-load vs a dense load (SmolLM2).

Run: HF_HUB_OFFLINE=1 python benchmarks/reload.py [--rank 16] [--layers all] [--repeats 3]

Prints one line per ratio (medians over --repeats, all measured in this one run):
  checkpoint_load / decompose_on_load = ...
  checkpoint_load / dense_load = ...
  cache_hit_load / dense_load = ...   (target <= 1.2)
Decompose-on-load runs with the cache off (cache=false), so it measures the decomposition.
The cache-hit load is what a second identical hf-tucker run does: a dense load, then the
factors from the decomposition cache (a private cache folder, primed once, untimed).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", default="16")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.assets import smollm2_path
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint, load_compressed, save_compressed

    src = Path(args.model) if args.model else smollm2_path()
    spec = {"rank": args.rank, "layers": args.layers, "cache": False}
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def dense() -> object:
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)

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
        x = torch.randint(0, 1000, (1, 32))
        with torch.no_grad():
            ref = model(x).logits
        del model

        def from_ckpt() -> object:
            return load_compressed(ck)

        times: dict[str, list[float]] = {"dense": [], "on_load": [], "ckpt": [], "cache": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all four alike
            for name, fn in (("dense", dense), ("on_load", on_load), ("ckpt", from_ckpt), ("cache", cache_hit)):
                t0 = time.perf_counter()
                m = fn()
                times[name].append(time.perf_counter() - t0)
                if name in ("ckpt", "cache"):
                    with torch.no_grad():
                        assert torch.equal(m(x).logits, ref), "checkpoint logits differ from decompose-on-load"
                del m
                gc.collect()  # models hold reference cycles: free them here, not inside the next timing
        med = {k: statistics.median(v) for k, v in times.items()}
        dense_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        ck_bytes = CompressedCheckpoint.open(ck).weight_bytes()
        print(
            f"# model={src.name} rank={args.rank} layers={args.layers} modules={len(report.plan.targets)} repeats={args.repeats} "
            f"dense={med['dense']:.2f}s decompose_on_load={med['on_load']:.2f}s checkpoint={med['ckpt']:.2f}s cache_hit={med['cache']:.2f}s "
            f"bytes ckpt/dense={ck_bytes / dense_bytes:.4f} params after/before={report.params_after / report.params_before:.4f}"
        )
        print(f"checkpoint_load / decompose_on_load = {med['ckpt'] / med['on_load']:.3f}")
        print(f"checkpoint_load / dense_load = {med['ckpt'] / med['dense']:.3f}")
        r = med["cache"] / med["dense"]
        print(f"cache_hit_load / dense_load = {r:.3f} (target <= 1.2) {'PASS' if r <= 1.2 else 'FAIL'}")


if __name__ == "__main__":
    main()
