#!/usr/bin/env python3
"""Compile the grid-row panel kernel for sm_90 here (no GPU) and print registers / spills / smem.

    python3 scripts/gr_compile_check.py [BM=128 BD=128 BD2=128 num_warps=8 num_stages=4 DT=bf16 RULE=1 ...]
"""
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnimoe.kernels import grid_row as gr

    kv = dict(a.split("=") for a in sys.argv[1:])
    dt = kv.pop("DT", "bf16")
    cfg = gr.panel_config(102400, dt == "fp32", 0, rule=bool(int(kv.pop("RULE", "0"))))
    for k, v in kv.items():
        cfg[k] = int(v)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    fn = gr._gr_panel_kernel
    sig = {}
    ptr = {"x_ptr": dt, "up_ptr": dt, "down_ptr": dt, "sgate_ptr": "fp32", "gscr_ptr": "fp32", "hscr_ptr": "fp32", "y_ptr": "fp32",
           "wsf_ptr": "fp32"}
    attrs = {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + ptr.get(p.name, "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "i32"
            if p.name == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=cfg, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        Path(d, "k.cubin").write_bytes(c.asm["cubin"])
        cuobj = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        out = subprocess.run([str(cuobj), "--dump-resource-usage", str(Path(d, "k.cubin"))], capture_output=True, text=True).stdout
    print(cfg, "warps", warps, "stages", stages, "shared", c.metadata.shared)
    print([l.strip() for l in out.splitlines() if "REG" in l])
    ptx = c.asm["ptx"]
    print("wgmma:", ptx.count("wgmma.mma_async"), "mma.sync:", ptx.count("mma.sync"), "red.v:", ptx.count("red.global.v"),
          "red:", ptx.count("red.global"), "atom:", ptx.count("atom.global"),
          "loops:", c.asm["ttgir"].count("scf.for "))


if __name__ == "__main__":
    main()
