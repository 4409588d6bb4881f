"""`bertkern info` / `python -m bertkern.info`: what is built and usable here, and why not."""
from __future__ import annotations

import platform
import sys

import torch

from bertkern import backend as _backend

OPS = ("bias_gelu", "add_layer_norm", "embedding_layer_norm", "masked_softmax", "attention", "attention_varlen")


def collect() -> dict:
    import bertkern
    from bertkern import ops

    info: dict = {
        "bertkern": bertkern.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "gpu": None,
        "triton_interpret": _backend.triton_interpreted(),
    }
    ok, why = _backend.triton_status()
    if ok:
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton_error"] = why

    built, why = _backend.cuda_extension_status()
    ext: dict = {"built": built}
    if built:
        ext["build_info"] = str(torch.ops.bertkern_cuda.build_info())
    else:
        ext["state"] = _backend.extension_diagnosis(ImportError(why)).state
        ext["why_not"] = why
    record = _backend.build_record()
    ext["build_record"] = record if record is not None else "none (installed before records, or not installed)"
    info["cuda_extension"] = ext

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = (f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                       f"{p.multi_processor_count} SMs)")
        if built:
            ext["kernels_for_this_gpu"] = _backend.cuda_arch_problem(torch.device("cuda", 0)) or "yes"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    per_backend = {}
    for name in _backend.BACKENDS:
        why = _backend.unavailable_reason(name, device)
        per_backend[name] = "usable" if why is None else f"unavailable: {why}"
    info[f"backends_on_{device.type}"] = per_backend

    auto = _backend.auto_backend(device)
    info["ops"] = {
        op: ("not implemented yet" if not hasattr(ops, op) else
             f"auto -> per input shape on {device.type} (bertkern.ops.attention_auto's table: a kernel or torch's own)"
             if op.startswith("attention") else f"auto -> {auto} on {device.type}")
        for op in OPS
    }
    from bertkern.ops import attention_auto

    # Rows of the table attention's auto follows ("arch dtype head_dim seq [mode] -> attention / attention_varlen").
    info["attention_auto_table"] = {
        f"{r['arch']} {r['dtype']} head_dim {r['head_dim']} seq {r['seq']}"
        + (f" {r['mode']} inference" if r.get("mode") else ""):
            f"attention -> {r.get('attention', '(next row)')}, attention_varlen -> "
            f"{r.get('attention_varlen', '(next row)')} ({r.get('why', '')})"
        for r in attention_auto.table()
    }
    return info


def format_info(info: dict, indent: int = 0) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(format_info(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bertkern info", description="What is built and usable here, and why not.")
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.error = lambda message: _usage_error(parser, message)  # type: ignore[method-assign]
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _usage_error(parser, message: str):
    """One line on stderr and exit 2 (argparse would print the whole usage first)."""
    print(f"{parser.prog}: {message} (see {parser.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
