"""Static performance report: what the compiled kernels would cost on a GPU, read from their SASS.

    python benchmarks/sass_report.py                 # every case, sm_90 and sm_80 -> benchmarks/results/static/
    python benchmarks/sass_report.py --only attention --arch 90 --print

No GPU is needed. Triton kernels are compiled exactly as the ops launch them at BERT shapes (the
launch functions run on meta tensors with their kernels swapped for recorders:
bertkern.triton.compile_check) for sm_90 and sm_80 with Triton's bundled ptxas; CUDA kernels are read
from the cubins in the built extension (bertkern/_C*.so, or --cuda-lib), the row kernels at each case's
launch (CUDA_LAUNCHES). For each kernel: registers, spill (stack) bytes, shared memory, CTAs per SM,
and a model of its hot loop from the SASS (MODEL_TEXT says how, and its limits: a static model for
comparing versions of a kernel, not a measurement; the GPU timings of benchmarks/run.py are the truth).

Targets (issue 12; sm_90, fp16, head dim 64; Triton and CUDA kernels alike): attention issue ratio
<= 1.2 (forward, no mask or a padding mask), 1.5 ([B,H,S,S] float mask), 1.3 (backward, per kernel);
row kernels within their per-element budget at >= 4 CTAs/SM; no spill anywhere (sm_80 and sm_90). A
check the code meets is a budget (tests/test_sass_report.py fails when it is broken); one it does not
meet yet is listed in KNOWN_GAPS and shown as "over target" in the report.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "static"
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bertkern.triton.compile_check import case_id  # noqa: E402  (the compile cases' names)

# ---------------------------------------------------------------- machine constants of the model
# per SM-cycle: fp16/bf16 dense tensor-core FLOPs; MUFU (ex2) lanes; warp-instructions issued (4 schedulers)
TC_FLOPS = {90: 4096, 80: 2048}
MUFU_LANES = 16
ISSUE_PER_CYCLE = 4
# thread-instructions per byte of DRAM traffic at full issue and copy bandwidth
# (H100 SXM: 3.0e13 / 3.0e12 B/s; A100 80 GB: 108 x 4 x 32 x 1.41e9 = 1.95e13 / 2.0e12 B/s)
INSTR_PER_BYTE = {90: 10.0, 80: 9.75}
SHARED_PER_SM = {80: 167936, 90: 233472}  # bytes; 1 KiB of each CTA's is reserved by the driver
MAX_CTAS, MAX_THREADS, REGS_PER_SM = 32, 2048, 65536

# ---------------------------------------------------------------- targets
ATTN_TARGET = {"fwd": {"none": 1.2, "bool_padding": 1.2, "varlen": 1.2, "float_BHSS": 1.5},
               "bwd": {"none": 1.3, "bool_padding": 1.3, "varlen": 1.3, "float_BHSS": 1.3}}
MIN_CTAS = 4  # elementwise / row kernels: enough CTAs per SM to keep loads in flight

# Checks the code does not meet yet: (case id, kernel, check). Reported "over target", not failed.
# tests/test_sass_report.py fails when a check outside this set is over target, and when one in it
# is met (then take it out: the met target becomes a budget).
KNOWN_GAPS: set[tuple[str, str, str]] = set()  # none
# CUDA kernels (csrc/) that spill today: (arch, kernel as _short() names it). A new spill fails the
# test until fixed or listed here with its reason.
KNOWN_CUDA_SPILLS: set[tuple[str, str]] = set()  # none


def _short(kernel: str) -> str:
    return re.sub(r"^void (bertkern::)?", "", kernel).split("(")[0]


def _gap_key(row: dict, check: str) -> tuple:
    """A check's key: a CUDA kernel's spill (arch, kernel) in KNOWN_CUDA_SPILLS (its kernel row and the
    cases that launch it share it); a case's launch (Triton, or CUDA at the case's shape) (case, kernel,
    check) in KNOWN_GAPS; a CUDA kernel row's other checks (arch, kernel, check) in KNOWN_GAPS."""
    if row["backend"] == "cuda" and check == "spill":
        return (row["arch"], _short(row["kernel"]))
    if "op" in row:
        return (row["id"], row["kernel"], check)
    return (row["arch"], _short(row["kernel"]), check)


def _bytes_per_element(op: str, direction: str, params: dict, kernel: str) -> float:
    """Bytes per element that must cross DRAM (fp16)."""
    e = 2
    if op == "bias_gelu":
        return e * (2 if direction == "fwd" else 3)  # x -> y;  dy, x -> dx
    if op == "add_layer_norm":
        train = params["variant"] == "train"
        if direction == "fwd":
            return e * (4 if train else 3)  # x, residual -> y (+ prenorm)
        return e * (5 if train else 3)  # dy, h (+ dprenorm) -> dh (+ dx)
    if op == "embedding_layer_norm":
        return e * 3  # word row -> y, prenorm (position / type rows stay in L2)
    if op == "masked_softmax":
        if direction == "fwd":
            return e * (3 if params.get("dropout_p") else 2)  # x -> y (+ probs); broadcast mask ~0
        return e * 3  # dy, probs -> dx
    if op == "attention" and kernel == "bwd_delta_kernel":
        return e * 2  # out, dout -> one fp32 per row
    raise KeyError((op, direction, kernel))


# ---------------------------------------------------------------- the cases (fp16, BERT shapes)
ATTN_VARIANTS = ("none", "bool_padding", "float_BHSS", "varlen", "additive_padding_dropout")


def cases(archs=(90, 80)) -> list[tuple]:
    c = []
    for cap in archs:
        c += [(cap, "bias_gelu", d, "fp16", dict(N=3072, approximate=a))
              for d in ("fwd", "bwd") for a in ("none", "tanh")]
        c += [(cap, "add_layer_norm", d, "fp16", dict(N=n, variant=v)) for d in ("fwd", "bwd") for n in (768, 1024)
              for v in ("train", "infer")]
        c += [(cap, "embedding_layer_norm", "fwd", "fp16", dict(N=768))]
        c += [(cap, "masked_softmax", d, "fp16", dict(N=n, mask=m, dropout_p=p)) for d in ("fwd", "bwd")
              for n in (128, 512) for m, p in (("bool", 0.0), ("additive", 0.1))]
        c += [(cap, "attention", d, "fp16", dict(D=64, S=s, variant=v)) for d in ("fwd", "bwd") for s in (128, 512)
              for v in ATTN_VARIANTS]
        c += [(cap, "attention", d, "fp16", dict(D=128, S=512, variant="none")) for d in ("fwd", "bwd")]
    return c


# A few cases compiled live by tests/test_sass_report.py (the rest is checked from report.json).
CI_CASES = ("sm90-attention-fwd-fp16-D64-S512-none", "sm90-attention-bwd-fp16-D64-S512-none",
            "sm90-masked_softmax-fwd-fp16-N512-bool_mask", "sm90-add_layer_norm-bwd-fp16-N768-train")


# ---------------------------------------------------------------- SASS
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """{function name: [(address, opcode, instruction text)]} from cuobjdump -sass output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSTR.search(line)
        if m and cur is not None:
            ins = _PRED.sub("", m.group(2).strip())
            cur.append((int(m.group(1), 16), ins.split()[0] if ins else "", m.group(2).strip()))
    return funcs


def _branch_target(text: str) -> int | None:
    m = re.search(r"\bBRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
    return int(m.group(1), 16) if m and m.group(1) else None


def loops(instrs) -> list[tuple[int, int]]:
    """Maximal loops (first, last address) of one function: backward branches not inside another."""
    spans = []
    for addr, op, text in instrs:
        if op.startswith("BRA"):
            t = _branch_target(text)
            if t is not None and t < addr:
                spans.append((t, addr))
    return [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]


def count(instrs, span=None) -> dict:
    """Instructions (NOPs and the final self-branch left out), MUFU and tensor-core ones, in span."""
    body = [(a, op) for a, op, t in instrs if (span is None or span[0] <= a <= span[1]) and op != "NOP"
            and not (op == "BRA" and _branch_target(t) == a)]
    return {"instructions": len(body), "mufu": sum(op.startswith("MUFU") for _, op in body),
            "mma": sum(op.startswith(("HMMA", "HGMMA", "WGMMA")) for _, op in body)}


def hot(instrs) -> dict:
    """The hot part of a kernel: its longest maximal loop and the sum over all maximal loops (a
    looped row kernel runs each pass once per tile), or the whole kernel if it has no loop."""
    spans = loops(instrs)
    if not spans:
        return {"loops": 0, **count(instrs)}
    longest = max(spans, key=lambda s: count(instrs, s)["instructions"])
    per = [count(instrs, s) for s in spans]
    return {"loops": len(spans), **count(instrs, longest),
            "all_loops": {k: sum(p[k] for p in per) for k in ("instructions", "mufu", "mma")}}


def ctas_per_sm(cap: int, registers: int, warps: int, shared: int) -> int:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp in 256s
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_threads = MAX_THREADS // (warps * 32)
    by_smem = SHARED_PER_SM[cap] // (shared + 1024)
    return max(0, min(MAX_CTAS, by_regs, by_threads, by_smem))


# ---------------------------------------------------------------- the model per kernel
_GEMMS = {"fwd_kernel": 2, "bwd_kernel": 5, "bwd_dkdv_kernel": 4, "bwd_dq_kernel": 3,
          "cuda_fwd": 2, "cuda_bwd": 5}  # csrc/attention.cu: the forward; the five-GEMM backward


def attention_model(cap: int, kernel: str, blocks: dict, sass_hot: dict) -> dict:
    """Issue / tensor-core / MUFU cycles of one CTA iteration of an attention kernel's key (or query)
    loop: BLOCK_M x BLOCK_N x BLOCK_D per GEMM, _GEMMS[kernel] GEMMs."""
    bm, bn, bd, warps = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_D"], blocks["warps"]
    issue = sass_hot["instructions"] * warps / ISSUE_PER_CYCLE
    tc = 2 * _GEMMS[kernel] * bm * bn * bd / TC_FLOPS[cap]
    mufu = sass_hot["mufu"] * 32 * warps / MUFU_LANES
    return {"kind": "attention", "gemms": _GEMMS[kernel], "issue_cycles": issue, "tensor_cycles": tc,
            "mufu_cycles": mufu, "ratio": round(issue / max(tc, mufu), 3),
            "bound": max((("issue", issue), ("tensor", tc), ("mufu", mufu)), key=lambda x: x[1])[0]}


def model(case, kernel: str, blocks: dict, warps: int, sass_hot: dict) -> dict | None:
    cap, op, direction, dt, params = case
    if kernel == "column_sum_kernel":  # a backward's partial rows: no per-element model (nor CUDA's, _COLSUM)
        return None
    if op == "attention" and kernel in _GEMMS:
        return attention_model(cap, kernel, {**blocks, "warps": warps}, sass_hot)
    rows = blocks.get("BLOCK_M", blocks.get("ROWS", 1))
    width = blocks.get("BLOCK_N", blocks.get("BLOCK_D"))
    real = params.get("N", params.get("D"))
    instr = sass_hot.get("all_loops", sass_hot)["instructions"]
    return elementwise_model(case, kernel, instr, warps * 32, rows * min(width, real))


def elementwise_model(case, kernel: str, instructions: int, threads: int, elements: int) -> dict:
    """Instructions per element of a row kernel: `instructions` run by each of `threads` threads of a
    CTA per `elements` elements, against 10 x the bytes per element that must cross DRAM."""
    cap, op, direction, dt, params = case
    b = _bytes_per_element(op, direction, params, kernel)
    return {"kind": "elementwise", "elements_per_iteration": elements, "bytes_per_element": b,
            "instr_per_element": round(instructions * threads / elements, 2),
            "budget": round(INSTR_PER_BYTE[cap] * b, 1)}


def _spill(row: dict) -> dict[str, tuple[float, float, bool]]:
    return {"spill": (row["stack"], 0, row["stack"] == 0)}


def stored_checks(checks: dict[str, tuple[float, float, bool]]) -> dict[str, dict]:
    """{check: (value, target, met)} as a row stores it in report.json."""
    return {k: {"value": v, "target": t, "met": ok} for k, (v, t, ok) in checks.items()}


def checks(case, row: dict) -> dict[str, tuple[float, float, bool]]:
    """{check: (value, target, met)} of a case's launch. Spills everywhere; the rest on sm_90 (the
    issue's targets)."""
    cap, op, direction, dt, params = case
    out = _spill(row)
    m = row.get("model")
    if cap != 90 or m is None:
        return out
    if m["kind"] == "attention":
        target = ATTN_TARGET[direction].get(params["variant"])
        if target is not None and params["D"] == 64:
            out["issue_ratio"] = (m["ratio"], target, m["ratio"] <= target)
    else:
        out["instr_per_element"] = (m["instr_per_element"], m["budget"], m["instr_per_element"] <= m["budget"])
        out["ctas_per_sm"] = (row["ctas_per_sm"], MIN_CTAS, row["ctas_per_sm"] >= MIN_CTAS)
    return out


def _case_row(case, backend: str, kernel: str, config: dict) -> dict:
    cap, op, direction, dt, params = case
    return {"id": case_id(case), "backend": backend, "arch": f"sm_{cap}", "op": op, "direction": direction,
            "kernel": kernel, "config": config}


# ---------------------------------------------------------------- Triton: compile what the ops launch
def _compile(job):
    from bertkern.triton.compile_check import compile_job

    r = compile_job(job, sass=True)
    if "sass" in r:
        funcs = parse_sass(r.pop("sass"))
        r["hot"] = hot(next(iter(funcs.values())))
    return r


def triton_rows(selected: list[tuple]) -> list[dict]:
    from bertkern.triton.compile_check import launch_job, op_launch, record_launches, toolchain_missing

    if reason := toolchain_missing():
        raise SystemExit(f"cannot compile Triton kernels here: {reason}")
    launches, jobs = [], {}
    for case in selected:
        cap, op, direction, dt, params = case
        module, call = op_launch(op, direction, dt, params)
        for home, name, args, kwargs in record_launches(module, call, cap):
            job = launch_job(home, name, args, kwargs, cap)
            if (case, name, repr(job)) not in launches:  # (both backward paths launch the same delta kernel)
                jobs.setdefault(repr(job), job)
                launches.append((case, name, repr(job)))
    with ProcessPoolExecutor() as pool:
        results = dict(zip(jobs, pool.map(_compile, jobs.values())))
    rows = []
    for case, name, key in launches:
        _, _, _, consts, _, warps, stages, cap = jobs[key]
        r = results[key]
        kernel = name.strip("_")
        blocks = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "ROWS")) and k != "ROWS64"}
        row = _case_row(case, "triton", kernel, {**blocks, "warps": warps, "stages": stages})
        if "error" in r:
            rows.append({**row, "error": r["error"].splitlines()[0][:300]})
            continue
        row.update(registers=r["registers"], stack=r["stack"], shared=r["shared"],
                   ctas_per_sm=ctas_per_sm(cap, r["registers"], warps, r["shared"]), hot=r["hot"])
        row["model"] = model(case, kernel, blocks, warps, r["hot"])
        row["checks"] = stored_checks(checks(case, row))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- CUDA: the built extension's cubins
# The CUDA kernels each case launches, as csrc's host code picks them for the Triton rows' inputs (fp16,
# 16-byte aligned rows, an additive mask in fp16, masks [B,1,1,S] expanded), keyed by the case id
# without its arch (the host picks the same on sm_80 and sm_90): (kernel, (block x, y), dynamic shared
# memory bytes, hot part, elements per CTA per hot part). Hot part (MODEL_TEXT): "loop", one iteration
# of the kernel's longest loop; "kernel", the whole body; None, no per-element model (the column sums).
# tests/test_sass_report.py checks kernel, block and shared memory against the host code run in the CPU
# emulation (tests/cuda_emu); the elements follow from the kernels' code (see each entry).
_COLSUM = ("column_sum_kernel<c10::Half, float>", (32, 16), 0, None, None)
CUDA_LAUNCHES: dict[str, list[tuple]] = {
    # bias_gelu: 384 vectors of 8 in 2 column tiles of 192 threads x 1 row lane (pick_tile), 4 rows
    # (kUnroll) of one vector per thread and loop iteration
    **{f"bias_gelu-{d}-fp16-N3072-gelu_{a}": [
        (f"bias_gelu_{d}_kernel<c10::Half, 8, {str(a == 'tanh').lower()}>", (192, 1), 0, "loop", 192 * 4 * 8),
        *[_COLSUM] * (d == "bwd")] for d in ("fwd", "bwd") for a in ("none", "tanh")},
    # add_layer_norm forward: 768 = 1 warp x 3 vectors of 8 a thread, 8 rows (teams) per 256 threads;
    # 1024 = 2 warps x 2 vectors, 4 rows per block (plan_team); no row loop; dropout in training
    **{f"add_layer_norm-fwd-fp16-N{n}-{v}": [
        (f"ln::ln_fwd_team_kernel<bertkern::ln::FwdParams<c10::Half>, 8, {it}, {str(v == 'train').lower()}>",
         (256, 1), 0, "kernel", rows * n)]
       for n, it, rows in ((768, 3, 8), (1024, 2, 4)) for v in ("train", "infer")},
    # backward: 1 vector a thread, 768 = 3 warps x 2 teams (192 threads), 1024 = 4 warps x 2 teams
    # (256); each team takes one row per loop iteration; N fp32 of shared memory to fold the teams'
    # column partials; one column_sum launch for dweight, dbias (and dx_bias in training); dropout in training
    **{f"add_layer_norm-bwd-fp16-N{n}-{v}": [
        (f"ln::add_ln_bwd_team_kernel<c10::Half, 8, 1, {str(v == 'train').lower()}>", (threads, 1), 4 * n, "loop",
         threads // (32 * wpr) * n), _COLSUM]
       for n, wpr, threads in ((768, 3, 192), (1024, 4, 256)) for v in ("train", "infer")},
    "embedding_layer_norm-fwd-fp16-N768": [
        ("ln::ln_fwd_team_kernel<bertkern::ln::EmbParams<c10::Half>, 8, 3, false>", (256, 1), 0, "kernel", 8 * 768)],
    # masked_softmax: a row of 128 keys = 16 lanes x 8, of 512 = 32 lanes x 16 (warp_shape); 128 threads
    # hold 8 or 4 rows; no row loop
    **{f"masked_softmax-fwd-fp16-N{n}-{m}_mask" + "-dropout" * (m == "additive"): [
        (f"masked_softmax_fwd_warp<c10::Half, {mask}, {elts}, true, {str(m == 'additive').lower()}>",
         (128, 1), 0, "kernel", 128 * elts)]
       for n, elts in ((128, 8), (512, 16)) for m, mask in (("bool", "BoolMask"), ("additive", "c10::Half"))},
    **{f"masked_softmax-bwd-fp16-N{n}-{m}_mask" + "-dropout" * (m == "additive"): [
        (f"masked_softmax_bwd_warp<c10::Half, {elts}, true>", (128, 1), 0, "kernel", 128 * elts)]
       for n, elts in ((128, 8), (512, 16)) for m in ("bool", "additive")},
}


def cuda_launches(case) -> list[tuple] | None:
    """The CUDA launches of a case (CUDA_LAUNCHES), or None where it has no CUDA path in the report."""
    return CUDA_LAUNCHES.get(case_id(case).split("-", 1)[1])


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    return re.sub(r"\s+", " ", out.replace("(anonymous namespace)::", ""))


def cuda_kernels(lib: str) -> dict[int, dict[str, dict]]:
    """{capability: {demangled kernel: registers, stack, static shared, local, SASS}} of a built
    extension (cuobjdump reads its embedded sm_80 / sm_90 cubins)."""
    import triton

    tool = triton.knobs.nvidia.cuobjdump.path
    out = {}
    for cap in (90, 80):
        res = subprocess.run([tool, "-res-usage", "-arch", f"sm_{cap}", lib], capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{cap}", lib], capture_output=True, text=True)
        funcs = parse_sass(sass.stdout)
        out[cap] = {
            _demangle(m.group(1)): {"registers": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                                    "local": int(m.group(5)), "sass": funcs.get(m.group(1), [])}
            for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)}
    return out


def cuda_rows(selected: list[tuple], lib: str | None, kernel_rows: bool = True) -> list[dict]:
    """One row per kernel and arch of the extension `lib` (unless not kernel_rows), with the cycle model
    for the attention kernels; then one row per CUDA launch of each selected case (cuda_case_row)."""
    if not lib:
        return [{"backend": "cuda", "error": "bertkern/_C*.so not built"}]
    kernels = cuda_kernels(lib)
    rows = []
    for cap, funcs in kernels.items() if kernel_rows else ():
        for name, k in funcs.items():
            row = {"id": f"sm{cap}-cuda-{name}", "backend": "cuda", "arch": f"sm_{cap}", "kernel": name,
                   **{f: k[f] for f in ("registers", "stack", "shared", "local")},
                   "hot": hot(k["sass"]) if k["sass"] else None}
            if (tiles := cuda_attention_tiles(name)) and row["hot"]:
                row["config"] = tiles
                row["model"] = attention_model(cap, tiles["model"], tiles, row["hot"])
            row["checks"] = stored_checks(cuda_checks(row))
            rows.append(row)
    for case in selected:
        by_name = {_short(n): k for n, k in kernels[case[0]].items()}
        for launch in cuda_launches(case) or ():
            rows.append(cuda_case_row(case, launch, by_name))
    return rows


def cuda_case_row(case, launch: tuple, kernels: dict[str, dict]) -> dict:
    """The row of one CUDA launch of a case: the kernel's resources in its cubin, CTAs/SM at the launch's
    block and shared memory, and the per-element model of its hot part (CUDA_LAUNCHES)."""
    cap = case[0]
    name, block, smem, part, elements = launch
    threads = block[0] * block[1]
    row = _case_row(case, "cuda", name, {"threads": threads, "dynamic_smem": smem, "hot": part})
    k = kernels.get(name)
    if k is None or not k["sass"]:
        return {**row, "error": "kernel not in the extension's cubins"}
    instrs = k["sass"]
    # sm_90 cubins count the 1 KiB the driver reserves per CTA in a kernel's shared memory (when it has
    # any; sm_80's do not): taken out here, as ctas_per_sm adds it for every CTA.
    static = k["shared"] - 1024 if cap == 90 and k["shared"] >= 1024 else k["shared"]
    sass_hot = {"loops": len(loops(instrs)), **count(instrs)} if part == "kernel" else hot(instrs)
    row.update(registers=k["registers"], stack=k["stack"], shared=static + smem,
               ctas_per_sm=ctas_per_sm(cap, k["registers"], math.ceil(threads / 32), static + smem),
               hot=sass_hot)
    if part is not None:
        row["model"] = elementwise_model(case, name, sass_hot["instructions"], threads, elements)
    row["checks"] = stored_checks(checks(case, row))
    return row


# csrc/attention.cu's attention_{fwd,bwd}_kernel<T, kD, mask kind, dropout>: their tiles are fixed at
# compile time (fwd::key_tile, bwd::tile: cuda_attention_tiles) and their loops have no run-time mask /
# dropout branches, so the cycle model applies as to the Triton kernels.
_CUDA_ATTN = re.compile(r"attention_(fwd|bwd)_kernel<([^,]+), (\d+), (\d), (true|false)>")
# Mask kinds: forward 0 none, 1 per key ([B,1,1,S_k]), 2 any 4-D; backward 1 none or per key, 2 any 4-D.
CUDA_ATTN_TARGET = {("fwd", 0): 1.2, ("fwd", 1): 1.2, ("fwd", 2): 1.5, ("bwd", 1): 1.3, ("bwd", 2): 1.3}


def cuda_attention_tiles(kernel: str) -> dict | None:
    m = _CUDA_ATTN.search(kernel)
    if not m:
        return None
    direction, d, mask, dropout = m.group(1), int(m.group(3)), int(m.group(4)), m.group(5) == "true"
    if direction == "fwd":
        tiles = {"BLOCK_M": 128, "BLOCK_N": 32 if d > 64 or (dropout and mask != 2) else 64}
    else:
        tiles = {"BLOCK_M": 64, "BLOCK_N": 64 if d <= 64 else 32}
    return {**tiles, "BLOCK_D": d, "warps": 4, "model": f"cuda_{direction}", "direction": direction,
            "dtype": m.group(2), "mask": mask, "dropout": dropout}


def cuda_checks(row: dict) -> dict[str, tuple[float, float, bool]]:
    """{check: (value, target, met)} of a CUDA kernel: the spill everywhere; the attention issue ratio
    on sm_90 for fp16, D = 64 and no dropout (as the Triton targets), from the row's hot-loop counts."""
    out = _spill(row)
    tiles = cuda_attention_tiles(row["kernel"])
    if row["arch"] != "sm_90" or not tiles or not row.get("hot") or tiles["dtype"] != "__half" \
            or tiles["BLOCK_D"] != 64 or tiles["dropout"]:
        return out
    target = CUDA_ATTN_TARGET.get((tiles["direction"], tiles["mask"]))
    if target is not None:
        ratio = attention_model(90, tiles["model"], tiles, row["hot"])["ratio"]
        out["issue_ratio"] = (ratio, target, ratio <= target)
    return out


# ---------------------------------------------------------------- gaps and output
def gaps(rows: list[dict]) -> tuple[list[tuple], list[tuple]]:
    """(unexpected: over target and not in KNOWN_GAPS, stale: in KNOWN_GAPS but met now), from the
    checks stored in the rows."""
    known = KNOWN_GAPS | KNOWN_CUDA_SPILLS
    missed = [_gap_key(r, name) for r in rows for name, c in r.get("checks", {}).items() if not c["met"]]
    # (case, kernel) / (arch, kernel): what ran, so that its listed gaps are known to be met or not
    ran = {_gap_key(r, c)[:2] for r in rows if "kernel" in r for c in ("spill", "instr_per_element")}
    stale = sorted(k for k in known if k[:2] in ran and k not in missed)
    return [k for k in missed if k not in known], stale


def _over_target(r: dict) -> list[str]:
    return [f"over target: {c['value']} CTAs/SM < {c['target']}" if name == "ctas_per_sm"
            else f"over target: {name} {c['value']} > {c['target']}"
            for name, c in r.get("checks", {}).items() if not c["met"]]


def _cycles(m: dict) -> str:
    return (f"issue {m['issue_cycles']:.0f} / tensor {m['tensor_cycles']:.0f} / MUFU {m['mufu_cycles']:.0f} cyc"
            f" = **{m['ratio']:.2f}x** ({m['bound']})")


def _fmt_row(r: dict) -> str:
    """A case's launch (Triton, or CUDA at the case's shape) as a table row."""
    cfg = r.get("config", {})
    if r["backend"] == "cuda":
        c = f"{cfg['threads']} threads, {cfg['dynamic_smem']} B dyn. smem, hot: {cfg['hot'] or '-'}"
    else:
        c = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in cfg.items() if k not in ("warps", "stages"))
        c += f" w{cfg.get('warps', '')}s{cfg.get('stages', '')}" if cfg else ""
    if "error" in r:
        return f"| {r['id']} | {r.get('kernel', '')} | {c} | error: {r['error'][:80]} |||||"
    m, h = r.get("model") or {}, r.get("hot") or {}
    if m.get("kind") == "attention":
        model_s = f"{h['instructions']} instr/iter: {_cycles(m)}"
    elif m.get("kind") == "elementwise":
        model_s = (f"**{m['instr_per_element']:.1f}** instr/elem (budget {m['budget']:.0f} at "
                   f"{m['bytes_per_element']:g} B/elem)")
    else:
        model_s = f"{h.get('instructions', '?')} instr in hot loop ({h.get('loops', 0)} loops)" if h else ""
    return (f"| {r['id']} | {r['kernel']} | {c} | {r['registers']} | {r['stack']} | {r['shared']} | "
            f"{r.get('ctas_per_sm', '')} | {model_s} | {'; '.join(_over_target(r)) or 'ok'} |")


def _fmt_kernel_row(r: dict) -> str:
    """A kernel of the CUDA extension (no case) as a table row."""
    h, m = r.get("hot"), r.get("model")
    counts = f"{h['instructions']} / {h['mufu']} / {h['mma']}" if h else ""
    model_s = (_cycles(m) if m else "") + "".join(f"; {s}" for s in _over_target(r))
    return (f"| {r.get('arch', '')} | `{r.get('kernel', r.get('error', ''))[:110]}` | {r.get('registers', '')} | "
            f"{r.get('stack', '')} | {r.get('shared', '')} | {counts} | {model_s} |")


def write(rows: list[dict], out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    unexpected, _ = gaps(rows)
    lines = [
        "# Static performance report (a model read from compiled SASS, not a measurement)",
        "",
        f"Generated by `python benchmarks/sass_report.py` ({meta['date']}, commit {meta['commit']}, "
        f"triton {meta['triton']}). No GPU involved: every Triton launch configuration the ops pick at BERT "
        "shapes (fp16) is compiled for sm_90 and sm_80 with Triton's bundled ptxas, the CUDA kernels are "
        "read from the built extension's cubins, and the hot loop of each kernel is counted in its SASS.",
        "",
        MODEL_TEXT,
        "",
        f"**{sum(1 for r in rows if _over_target(r))} kernel launches over a target** (listed in `KNOWN_GAPS`, "
        f"shown as 'over target'); {len(unexpected)} unexpected. Spills: "
        f"{sum(1 for r in rows if r.get('stack'))} kernels with stack bytes.",
        "",
        "| case | kernel | tiles | regs | spill B | shared B | CTAs/SM | hot loop model | status |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_fmt_row(r) for r in rows if r["backend"] == "triton"],
        "",
        "## CUDA row kernels at the cases' shapes (bertkern/_C, from the cubins)",
        "",
        "The kernels csrc's host code launches for each case (`CUDA_LAUNCHES`, checked against the host code "
        "run in the CPU emulation by tests/test_sass_report.py), with the same per-element model and targets "
        f"as the Triton rows. Extension read: {json.dumps(meta.get('cuda_lib', 'none'))}.",
        "",
        "| case | kernel | launch | regs | spill B | shared B (static + dynamic) | CTAs/SM | hot part model | status |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_fmt_row(r) for r in rows if r["backend"] == "cuda" and "op" in r],
        "",
        "## CUDA kernels (bertkern/_C, from the cubins)",
        "",
        "Every kernel in the extension: resources and hot-loop instruction counts "
        "(for comparing versions), plus the attention model above for the attention kernels, whose tiles "
        "are fixed at compile time: the forward 128 queries x 64 keys per loop iteration (x 32 at D = 80 "
        "and 128), 2 GEMMs; the backward 64 keys x 64 queries (x 32 at D = 80 and 128), 5 GEMMs; 4 warps. "
        "Targets as for Triton, checked on sm_90 for fp16, D = 64 without dropout: forward 1.2 with no "
        "mask or a per-key mask (kind 0, 1), 1.5 with any 4-D mask (kind 2); backward 1.3.",
        "",
        "| arch | kernel | regs | spill B | shared B (static) | hot loop: instr / MUFU / MMA | model |",
        "|---|---|---|---|---|---|---|",
        *[_fmt_kernel_row(r) for r in rows if r["backend"] == "cuda" and "op" not in r],
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))


MODEL_TEXT = """## The model

- **Attention** (forward, dK/dV, dQ kernels): per CTA iteration of the key (or query) loop,
  *issue* = SASS instructions in the loop x warps / 4 (4 schedulers per SM, one warp-instruction per
  cycle each), *tensor* = the tile's GEMM FLOPs (2 x M x N x D per GEMM: 2 in the forward, 4 in dK/dV,
  3 in dQ) / 4096 per SM-cycle (H100 fp16 dense; A100 2048), *MUFU* = MUFU instructions x 32 lanes x
  warps / 16 per SM-cycle. ratio = issue / max(tensor, MUFU): at or under 1 the loop's instruction stream
  hides behind its math; above 1 the loop is issue-bound by that factor. Targets (sm_90, D = 64): 1.2
  (no mask, padding mask, varlen), 1.5 ([B,H,S,S] float mask), 1.3 per backward kernel. Dropout variants
  are reported without a target.
- **Elementwise / row kernels**: instructions per element = SASS instructions of the hot loop (all
  loops of a looped kernel; the whole kernel when it has none) x threads / elements per iteration,
  against 10 x (bytes per element that must cross DRAM) on H100 (3.0e13 thread-instructions/s over
  3.0 TB/s; A100: 9.75 x). Above the budget the kernel cannot reach the copy bandwidth. Target also
  >= 4 CTAs/SM.
- **CUDA row kernels** (csrc/, at each case's shape): the kernel, block and dynamic shared memory the
  host code picks (`CUDA_LAUNCHES`); the hot part is one iteration of the kernel's longest loop for a
  kernel with a row loop (bias_gelu's rows, the LayerNorm backward's rows per team: the loops after it
  are once-per-CTA epilogues), or the whole kernel for one without (a row held in registers: the
  LayerNorm forward, the softmax warp kernels), whose instructions are counted once per CTA's rows
  (every path once: the dropout, prenorm and affine branches not taken too). Instructions per element =
  that count x threads per CTA / elements per CTA in it, against the same budget.
- **CTAs/SM** from registers (allocated per warp in units of 256), threads (2048/SM), shared memory
  (228 KiB on H100, 164 KiB on A100, 1 KiB reserved per CTA) and the 32-CTA limit.

Limits: a count of static instructions, not a simulation. It ignores latency (a loop at ratio 1 still
needs enough warps to hide loads and MMA latency), dual issue and the uniform datapath, memory-system
effects (L2 hit rates, bank conflicts, TMA), the prologue and epilogue of each program (amortised over
the loop only for attention), branches not taken (a static count of a loop-free kernel counts every
path once, e.g. a software division's slow path) and calls into subroutines from inside a loop. The
clock, issue rate and FLOP rate are nominal H100 SXM / A100 figures. It ranks versions of a kernel and
says which resource a loop is bound by; GPU timings (benchmarks/run.py) are the truth."""


def _git(cwd, *args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _meta(cuda_lib: str | None) -> dict:
    import triton

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git(ROOT, "rev-parse", "--short", "HEAD") or "?", "triton": triton.__version__,
            "model": "static SASS count; see report.md"}
    if cuda_lib:
        # The extension's csrc: the commit of the tree it was built in, and whether csrc there differs
        # from it or from this tree's HEAD (a report must not read a stale build).
        tree = Path(cuda_lib).resolve().parents[1]
        built = _git(tree, "rev-parse", "--short", "HEAD")
        dirty = bool(_git(tree, "status", "--porcelain", "--", "csrc"))
        same = bool(built) and subprocess.run(["git", "diff", "--quiet", built, "HEAD", "--", "csrc"],
                                              cwd=ROOT).returncode == 0
        meta["cuda_lib"] = {"built_at": built or "?", "csrc_dirty": dirty, "csrc_matches_head": same and not dirty}
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated capabilities (default 90,80)")
    ap.add_argument("--only", default=None, help="regex on case ids")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's cubins")
    ap.add_argument("--cuda-lib", default=None, help="the built extension to read (default bertkern/_C*.so here)")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--print", action="store_true", help="print the table instead of writing the report")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON (for tests)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles real GPU kernels")
    archs = tuple(int(a) for a in args.arch.split(","))
    selected = [c for c in cases(archs) if args.only is None or re.search(args.only, case_id(c))]
    rows = triton_rows(selected)
    # the extension to read: --cuda-lib, else the first bertkern/_C*.so built here
    lib = None if args.no_cuda else args.cuda_lib or min(glob.glob(str(ROOT / "bertkern" / "_C*.so")), default=None)
    if not args.no_cuda:
        rows += cuda_rows(selected, lib, kernel_rows=args.only is None)
    if args.json:
        print(json.dumps(rows))
    elif args.print:
        for r in rows:
            print(_fmt_row(r) if "op" in r else _fmt_kernel_row(r))
    else:
        write(rows, Path(args.out), _meta(lib))
        print(f"wrote {args.out}/report.json and report.md ({len(rows)} rows)")
    unexpected, stale = gaps(rows)
    for k in unexpected:
        print("over target (not in KNOWN_GAPS):", k, file=sys.stderr)
    for k in stale:
        print("meets target now (remove from KNOWN_GAPS):", k, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
