"""Print the short table that ends scripts/device_check.sh, from its JSON files (kernel, bench, and the engine's
greedy agreement when given)."""

from __future__ import annotations

import json
import sys


def fmt(x, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def main(kernel_path: str, bench_path: str, agreement_path: str | None = None) -> int:
    kernel = json.load(open(kernel_path))
    bench = json.load(open(bench_path))
    agreement = json.load(open(agreement_path)) if agreement_path else None
    ok = all(r["passed"] for r in kernel["correctness"])
    print()
    print(f"== device check on {kernel['device']} ==")
    print(f"kernel vs reference: {len(kernel['correctness'])} cases, {'all within tolerance' if ok else 'FAILURES'}; "
          f"worst rel err {max(r['max_rel_err'] for r in kernel['correctness']):.2e}")
    paged = [r for r in kernel["correctness"] if r["case"].startswith("paged_")]
    if paged:
        print(f"  of which paged (16-token blocks, random block table): {len(paged)} cases, "
              f"{'all within tolerance' if all(r['passed'] for r in paged) else 'FAILURES'}")
    timing = kernel["timing"]
    print(f"decode attention (copy bandwidth {timing['copy_bandwidth_GBps']:.0f} GB/s; paged/contig = paged kernel "
          f"time / contiguous kernel time; paged sdpa = the gather + SDPA fallback)")
    print(f"{'batch':>5} {'context':>8} {'triton us':>10} {'paged us':>9} {'paged/contig':>12} {'paged sdpa us':>13} "
          f"{'flash us':>9} {'effic us':>9} {'roofline us':>12} {'of copy bw':>11}")
    for section in ("timing", "timing_batched"):
        for r in kernel.get(section, {}).get("rows", []):
            print(f"{r['batch']:>5} {r['context']:>8} {r['triton_us']:>10.1f} {fmt(r.get('paged_us')):>9} "
                  f"{fmt(r.get('paged_vs_contiguous'), '.2f'):>11}x {fmt(r.get('paged_sdpa_us')):>13} "
                  f"{fmt(r['sdpa_flash_us']):>9} {fmt(r['sdpa_efficient_us']):>9} {r['roofline_us']:>12.1f} "
                  f"{100 * r['fraction_of_copy_bandwidth']:>10.1f}%")
    if agreement is not None:
        print(f"engine greedy tokens alone vs {agreement['concurrency']} together ({agreement['device']}, "
              f"{agreement['dtype']}, packed prefill + paged {agreement['decode_backend']} decode): {agreement['identical']}/"
              f"{agreement['requests']} identical, {agreement['tokens_before_first_difference']}/"
              f"{agreement['tokens']} tokens before the first difference")
    print(f"r4b bench · {bench['model']} · {bench['dtype']} · prompt {bench['prompt_tokens']} · "
          f"{bench['max_new_tokens']} new tokens")
    prefill = bench.get("prefill", {})
    for stage in ("prefill_text", "prefill_image", "vision"):
        if stage in prefill:
            sides = " · ".join(f"{side} {1e3 * t['median_s']:.1f} ms" for side, t in prefill[stage].items()
                               if isinstance(t, dict))
            print(f"  {stage:<14} {sides}")
    for name, v in bench["decode"].items():
        print(f"  {name:<30} {v['tokens_per_s']:8.1f} tokens/s  ({100 * v['share_of_limit']:.1f} % of its "
              f"{v['limit_tokens_per_s']:.0f} tokens/s limit)")
    ratios = [f"batch {b} {bench[f'batch{b}_throughput_ratio_ours_vs_transformers']:.2f}x" for b in (1, 4, 8)
              if f"batch{b}_throughput_ratio_ours_vs_transformers" in bench]
    print(f"  ours / transformers decode: {', '.join(ratios) or 'n/a'} · peak memory "
          f"{bench['peak_memory_bytes'] / 1024**3:.1f} GiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
