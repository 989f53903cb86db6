"""Compare tucker, rom, whiten, asvd, fwsvd and fwhiten on SmolLM2-135M-Instruct at budgets 0.9 / 0.8 and the research recipe.

For each configuration: realised parameter cut (whole model), token-level perplexity on
held-out wikitext (documents 0..49: calibration uses 50..61, see calibration.py),
LAMBADA last-word accuracy and perplexity on the first N test examples, decomposition
time (calibration included) and the peak RSS growth during compression.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/methods.py --wiki-windows 8 --lambada 30 --calib-n 16

CPU-only and small by default so it finishes in minutes on a laptop; the numbers are a
quick comparison, not lm-eval's word perplexity. On a machine whose cores are shared with
other jobs run it with OMP_NUM_THREADS=1: oversubscribed OpenMP threads made LAPACK SVD and
eigh calls 20-50x slower here (a 1536x576 SVD took 20 s on 2 busy threads, 1 s on one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The calibration sources must not be scored: the benchmark scores wikitext docs 0..49 and LAMBADA.
os.environ.setdefault("LM_EVAL_LOWRANK_EVAL_TASKS", "lambada_openai_local")

CONFIGS: dict[str, dict] = {
    "dense": {},
    "research rank=1 L3|15|28 tucker": {"method": "tucker", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 rom": {"method": "rom", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 whiten": {"method": "whiten", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 asvd": {"method": "asvd", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 asvd rms": {"method": "asvd", "rank": 1, "layers": "3|15|28", "asvd_stat": "rms"},
    "research rank=1 L3|15|28 fwsvd": {"method": "fwsvd", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 fwhiten": {"method": "fwhiten", "rank": 1, "layers": "3|15|28"},
    "research rank=1 L3|15|28 tucker exact": {"method": "tucker", "rank": 1, "layers": "3|15|28", "solver": "exact"},
    "b0.9 uniform tucker": {"method": "tucker", "budget": 0.9},
    "b0.9 uniform rom": {"method": "rom", "budget": 0.9},
    "b0.9 uniform whiten": {"method": "whiten", "budget": 0.9},
    "b0.9 uniform asvd": {"method": "asvd", "budget": 0.9},
    "b0.9 uniform fwsvd": {"method": "fwsvd", "budget": 0.9},
    "b0.9 uniform fwhiten": {"method": "fwhiten", "budget": 0.9},
    "b0.9 uniform asvd alpha=1": {"method": "asvd", "budget": 0.9, "asvd_alpha": 1.0},
    "b0.9 uniform asvd rms": {"method": "asvd", "budget": 0.9, "asvd_stat": "rms"},
    "b0.9 uniform asvd rms alpha=1": {"method": "asvd", "budget": 0.9, "asvd_alpha": 1.0, "asvd_stat": "rms"},
    "b0.9 tail whiten": {"method": "whiten", "budget": 0.9, "allocator": "tail"},
    "b0.9 output_error whiten": {"method": "whiten", "budget": 0.9, "allocator": "output_error"},
    "b0.9 sensitivity(measured) whiten": {"method": "whiten", "budget": 0.9, "allocator": "sensitivity"},
    "b0.9 sensitivity(measured) fwhiten": {"method": "fwhiten", "budget": 0.9, "allocator": "sensitivity"},
    # The K-FAC loss estimate: one gradient pass and one dense calibration pass, no per-layer measurement.
    "b0.9 fisher whiten": {"method": "whiten", "budget": 0.9, "allocator": "fisher"},
    "b0.9 fisher fwhiten": {"method": "fwhiten", "budget": 0.9, "allocator": "fisher"},
    "b0.9 fisher tucker": {"method": "tucker", "budget": 0.9, "allocator": "fisher"},
    "b0.9 fisher asvd": {"method": "asvd", "budget": 0.9, "allocator": "fisher"},
    "b0.9 fisher fwsvd": {"method": "fwsvd", "budget": 0.9, "allocator": "fisher"},
    "b0.8 fisher whiten": {"method": "whiten", "budget": 0.8, "allocator": "fisher"},
    "b0.8 uniform tucker": {"method": "tucker", "budget": 0.8},
    "b0.8 uniform rom": {"method": "rom", "budget": 0.8},
    "b0.8 uniform whiten": {"method": "whiten", "budget": 0.8},
    "b0.8 uniform asvd": {"method": "asvd", "budget": 0.8},
    "b0.8 tail whiten": {"method": "whiten", "budget": 0.8, "allocator": "tail"},
    "b0.8 output_error whiten": {"method": "whiten", "budget": 0.8, "allocator": "output_error"},
    "b0.8 sensitivity(measured) whiten": {"method": "whiten", "budget": 0.8, "allocator": "sensitivity"},
    # Where the rank goes: keep 70 % of every matrix in every third layer (about an 8 % cut).
    "b0.7 every-3rd-layer whiten": {"method": "whiten", "budget": 0.7, "layers": "3-30:3"},
    "b0.7 every-3rd-layer tucker": {"method": "tucker", "budget": 0.7, "layers": "3-30:3"},
    "b0.7 every-3rd-layer fwsvd": {"method": "fwsvd", "budget": 0.7, "layers": "3-30:3"},
    "b0.7 every-3rd-layer fwhiten": {"method": "fwhiten", "budget": 0.7, "layers": "3-30:3"},
    "b0.7 every-3rd-layer asvd": {"method": "asvd", "budget": 0.7, "layers": "3-30:3"},
    # A mild cut, where a loss's second-order expansion (fwsvd's premise) holds: 90 % of every third layer.
    "b0.9 every-3rd-layer tucker": {"method": "tucker", "budget": 0.9, "layers": "3-30:3"},
    "b0.9 every-3rd-layer fwsvd": {"method": "fwsvd", "budget": 0.9, "layers": "3-30:3"},
    "b0.9 every-3rd-layer fwhiten": {"method": "fwhiten", "budget": 0.9, "layers": "3-30:3"},
    "b0.9 every-3rd-layer asvd": {"method": "asvd", "budget": 0.9, "layers": "3-30:3"},
    "b0.9 every-3rd-layer whiten": {"method": "whiten", "budget": 0.9, "layers": "3-30:3"},
    # Error correction (fit the dense model's outputs; 0.25 = a 1:3 blend with the compressed model's own)
    # and staged calibration within a layer (q,k,v -> o -> gate,up -> down). 0.25 staged is the default.
    "b0.7 every-3rd-layer whiten dense-target": {"method": "whiten", "budget": 0.7, "layers": "3-30:3", "calib_target": "dense", "calib_staged": False},
    "b0.7 every-3rd-layer whiten dense-target staged": {"method": "whiten", "budget": 0.7, "layers": "3-30:3", "calib_target": "dense", "calib_staged": True},
    "b0.7 every-3rd-layer whiten staged": {"method": "whiten", "budget": 0.7, "layers": "3-30:3", "calib_target": "compressed", "calib_staged": True},
    "b0.7 every-3rd-layer whiten target 0.25": {"method": "whiten", "budget": 0.7, "layers": "3-30:3", "calib_target": 0.25, "calib_staged": False},
    "b0.7 every-3rd-layer whiten target 0.25 staged": {"method": "whiten", "budget": 0.7, "layers": "3-30:3", "calib_target": 0.25, "calib_staged": True},
    "b0.9 uniform whiten target 0.25 staged": {"method": "whiten", "budget": 0.9, "calib_target": 0.25, "calib_staged": True},
    "b0.9 tail whiten target 0.25 staged": {"method": "whiten", "budget": 0.9, "allocator": "tail", "calib_target": 0.25, "calib_staged": True},
    "b0.9 output_error whiten target 0.25 staged": {"method": "whiten", "budget": 0.9, "allocator": "output_error", "calib_target": 0.25, "calib_staged": True},
    "b0.9 sensitivity(measured) whiten target 0.25 staged": {"method": "whiten", "budget": 0.9, "allocator": "sensitivity", "calib_target": 0.25, "calib_staged": True},
}
# The rows measured before error correction existed: keep them meaning the same whatever the defaults.
for _name, _spec in CONFIGS.items():
    if _spec.get("method") in ("whiten", "fwhiten"):  # the same targets, so that the two compare
        _spec.setdefault("calib_target", "compressed")
        _spec.setdefault("calib_staged", False)


class PeakRSS:
    """Peak resident memory growth over a block, sampled every 20 ms from /proc."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def wikitext_eval_ids(tok, windows: int, length: int) -> torch.Tensor:
    from lm_eval_lowrank.calibration import WIKITEXT_EVAL_DOCS, _read_jsonl, data_root

    docs = _read_jsonl(data_root() / "wikitext" / "test.jsonl")
    ids: list[int] = []
    for i in WIKITEXT_EVAL_DOCS:  # never the calibration documents
        ids += tok(docs[i]["page"], add_special_tokens=False)["input_ids"]
        if len(ids) >= windows * length * 4:
            break
    stride = len(ids) // windows  # spread the windows over the text
    return torch.tensor([ids[k * stride : k * stride + length] for k in range(windows)])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(nll / n)


@torch.no_grad()
def lambada(model, tok, n: int) -> tuple[float, float]:
    from lm_eval_lowrank.calibration import _read_jsonl, data_root

    docs = _read_jsonl(data_root() / "lambada_openai" / "test.jsonl")[:n]
    hits, nll, count = 0, 0.0, 0
    for d in docs:
        ctx, _, last = d["text"].rpartition(" ")
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        t = tok(" " + last, add_special_tokens=False)["input_ids"]
        x = torch.tensor([c + t])
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0, len(c) - 1 : -1]
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
        tgt = torch.tensor(t)
        nll -= float(logp[torch.arange(len(t)), tgt].sum())
        count += 1
        hits += int(bool((logp.argmax(-1) == tgt).all()))
    return hits / len(docs), math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="all", help="comma-separated names from CONFIGS, or all")
    ap.add_argument("--wiki-windows", type=int, default=8)
    ap.add_argument("--wiki-len", type=int, default=128)
    ap.add_argument("--lambada", type=int, default=30)
    ap.add_argument("--calib", default="wikitext_local")
    ap.add_argument("--calib-n", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--rank-multiple", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.assets import smollm2_path
    from lm_eval_lowrank.spec import CALIBRATED_ALLOCATORS

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    wiki = wikitext_eval_ids(tok, args.wiki_windows, args.wiki_len)
    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    rows = []
    print(f"# SmolLM2-135M-Instruct, CPU fp32, torch threads {torch.get_num_threads()}; wikitext {args.wiki_windows}x{args.wiki_len} tokens (docs 0..49), "
          f"LAMBADA first {args.lambada}, calib={args.calib} {args.calib_n}x{args.calib_len}, rank_multiple={args.rank_multiple}", flush=True)
    print("| config | param cut (model) | kept of targeted | wikitext ppl | LAMBADA acc | LAMBADA ppl | decomp s | peak RSS +MiB |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        spec = dict(CONFIGS[name])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        report = None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if spec:
                spec.setdefault("calib_n", args.calib_n)
                spec.setdefault("calib_len", args.calib_len)
                if spec.get("method") != "tucker" or spec.get("allocator") in CALIBRATED_ALLOCATORS:
                    spec.setdefault("calib", args.calib)
                if "budget" in spec:
                    spec.setdefault("rank_multiple", args.rank_multiple)
                report = compress_model(model, spec, tokenizer=tok, model_id=str(path), progress=False).to_dict()
            secs = time.perf_counter() - t0
        ppl = perplexity(model, wiki)
        acc, lppl = lambada(model, tok, args.lambada)
        cut = report["param_reduction"] if report else 0.0
        kept = 1 - report["params_removed"] / report["targeted_params_before"] if report and "budget" not in spec else None
        if report and "budget" in spec:
            alloc = (report.get("calibration") or {}).get("allocation")
            sel = alloc["selected_params"] if alloc else None
            kept = alloc["realised_keep"] if alloc else None
            if kept is None:  # tucker without calibration: no provider to carry the record
                from lm_eval_lowrank.allocation import candidates
                from lm_eval_lowrank.architectures import adapter_for_model
                from lm_eval_lowrank.spec import DecompositionSpec

                cands = candidates(DecompositionSpec.from_args(spec), model.config, adapter_for_model(model))
                sel = sum(c.dense for c in cands)
                kept = 1 - report["params_removed"] / sel
        row = {"config": name, "spec": spec, "param_cut": cut, "kept_of_targeted": kept, "wikitext_ppl": ppl, "lambada_acc": acc, "lambada_ppl": lppl, "decomp_seconds": secs, "peak_rss_growth_mib": mem.growth_mib}
        if report:
            row["calibration"] = report.get("calibration")
        rows.append(row)
        k = "-" if kept is None else f"{kept:.3f}"
        print(f"| {name} | {cut:.2%} | {k} | {ppl:.1f} | {acc:.3f} | {lppl:.1f} | {secs:.1f} | {mem.growth_mib:.0f} |", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1, default=str)
        del model


if __name__ == "__main__":
    sys.exit(main())
