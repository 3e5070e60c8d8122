"""Compile the NSA prefill and decode kernels for an NVIDIA target on any machine (no GPU needed) and report
their registers, spills and shared memory, as ptxas sees them (and the non-finite rule's row passes).

    python -m bench.compile_kernels                 # sm_90 (H100 / H200), the paper's and the public head dims
    python -m bench.compile_kernels --arch 80 --head-dims 128

Triton's CPU interpreter runs a kernel's math but not its compiler: a construct the compiler rejects (a
global that is not a tl.constexpr, a layout the passes cannot handle) passes every interpreter test and only
fails on the GPU. tests/test_nsa_kernels_compile.py compiles every kernel here, in CI, for sm_90. Argument
types follow the kernels' naming: ``*_ptr`` is a bf16 tensor unless listed as float32 or int32 below, a name
with "scale" is a float, any other runtime argument an int32; strides get Triton's divisibility-by-16 hint. The
decode kernels (public shape, batch 32's launch constants) name their pointer types in their cases.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from bench.env_info import Distinct, positive_int
from nsa.functional import NSASizes
from nsa.kernels import decode, range_attention, selected, topn
from nsa.kernels import rows as row_passes
from nsa.kernels.launch_args import cdiv, next_power_of_2, split_dims
from nsa.kernels.range_attention import RangeTiles, tiles_for
from nsa.kernels.selected import SelectedTiles
from nsa.kernels.topn import topn_tiles_for
from nsa.prefill import topn_tile_shape

FLOAT32_POINTERS = ("lse_ptr", "delta_ptr", "part_k_ptr", "part_v_ptr")
INT32_POINTERS = ("cu_q_ptr", "cu_k_ptr", "tile_seq_ptr", "tile_first_ptr", "idx_ptr", "cu_ptr", "token_seq_ptr",
                  "entries_ptr", "chunk_list_ptr", "chunk_start_ptr", "list_end_ptr", "block_seq_ptr",
                  "cu_blocks_ptr", "list_chunks_ptr", "union_ptr", "count_ptr", "slots_ptr")
DKDV_GATES = (("gate_ptr", "*fp32"),)  # as every dk/dv kernel reads them (nsa.prefill.dkdv_gates)
BLOCKS = {"block_size": 32, "block_stride": 16, "sel_block_size": 64, "num_selected": 16, "window_size": 512}
# the NVIDIA compute capabilities Triton 3.6 compiles these kernels for: any other number aborts LLVM without a
# message (0, 69, 71, 95: "Cannot select: intrinsic") or fails in ptxas (110, 35)
ARCHES = (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 120, 121)
RULES = {"cmp": {"STRIDE": BLOCKS["block_stride"], "SPAN": BLOCKS["block_size"], "WINDOW": 0},
         "win": {"STRIDE": 1, "SPAN": 1, "WINDOW": BLOCKS["window_size"]}}


class KernelCase(NamedTuple):
    name: str
    fn: Any
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    float32_outputs: tuple[str, ...] = ()
    pointer_types: tuple[tuple[str, str], ...] = ()  # (name, Triton type) overriding the naming rule


def warps_stages(launch: dict[str, int]) -> tuple[int, int]:
    """(num_warps, num_stages) of a launcher's settings (selected.query_launch / forced_launch), positional for
    KernelCase: unpacked with ** a dict[str, int] could fill any of its fields, as far as mypy knows."""
    return launch["num_warps"], launch["num_stages"]


def _signature(fn: Any, constexprs: dict[str, Any], float32_outputs: tuple[str, ...],
               pointer_types: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    signature = {}
    types = dict(pointer_types)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = ("*fp32" if name in FLOAT32_POINTERS or name in float32_outputs
                               else "*i32" if name in INT32_POINTERS else "*bf16")
        else:
            signature[name] = "fp32" if "scale" in name else "i32"
    return signature


def descriptor_args(tma: bool, rows: int, dims: dict[str, int], values: bool = True
                    ) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """(constexprs, argument types) of a kernel's k_desc1 / k_desc2 / v_desc: bf16 descriptors of ``rows`` K / V
    rows of one head (nsa.kernels.tiles.kv_descriptors) where tma, else None (pointer loads); ``values`` False: a
    kernel without v_desc (the top-n reads keys only)."""
    if not tma:
        return {"TMA": False, "k_desc1": None, "k_desc2": None, **({"v_desc": None} if values else {})}, ()
    types = [("k_desc1", f"tensordesc<bf16[{rows},1,{dims['D1']}]>")]
    if values:
        types.append(("v_desc", f"tensordesc<bf16[{rows},1,{dims['BLOCK_DV']}]>"))
    if not dims["D2"]:
        return {"TMA": True, "k_desc2": None}, tuple(types)
    return {"TMA": True}, (*types, ("k_desc2", f"tensordesc<bf16[{rows},1,{dims['D2']}]>"))


def range_cases(branch: str, tiles: RangeTiles, group: int, dims: dict[str, int], suffix: str = ""
                ) -> Iterator[KernelCase]:
    """The range forward, dq and dk/dv of ``branch`` ("cmp" / "win") as their launchers run them under ``tiles``
    (K / V through descriptors where tiles.tma)."""
    rule = RULES[branch]
    common = {"GROUP": group, "PRECISION": "tf32", "ROW_T": tl.int32, **dims, **rule, "HAS_GATE": True}
    tma, tma_types = descriptor_args(tiles.tma, tiles.fwd_n, dims)
    yield KernelCase(f"fwd_{branch}{suffix}", range_attention._range_fwd_kernel,
                     {**common, **tma, "BLOCK_M": tiles.fwd_m, "BLOCK_N": tiles.fwd_n, "ACCUMULATE": branch == "win",
                      "HEAD_ROWS": range_attention.query_rows(group, tiles.fwd_m, tiles).head_rows},
                     tiles.num_warps, tiles.num_stages, pointer_types=tma_types)
    tma, tma_types = descriptor_args(tiles.tma, tiles.dq_n, dims)
    yield KernelCase(f"dq_{branch}{suffix}", range_attention._range_dq_kernel,
                     {**common, **tma, "BLOCK_M": tiles.dq_m, "BLOCK_N": tiles.dq_n, "ACCUMULATE": True,
                      "HEAD_ROWS": range_attention.query_rows(group, tiles.dq_m, tiles).head_rows},
                     tiles.dq_num_warps, tiles.dq_num_stages, pointer_types=tma_types)
    yield KernelCase(f"dkdv_{branch}{suffix}", range_attention._range_dkdv_kernel,
                     {**common, "BLOCK_M": tiles.dkv_m, "BLOCK_N": tiles.dkv_n,
                      "GP": range_attention.dkv_head_rows(group, tiles)},
                     tiles.dkv_num_warps, tiles.dkv_num_stages, ("dk_ptr", "dv_ptr"), DKDV_GATES)


def selected_dkdv_cases(tiles: SelectedTiles, group: int, dims: dict[str, int], suffix: str = ""
                        ) -> Iterator[KernelCase]:
    """The selection dk/dv as its launcher runs it under ``tiles`` (64-key blocks)."""
    yield KernelCase(f"dkdv_sel{suffix}", selected._sel_dkdv_kernel,
                     {"GROUP": group, "SEL_BLOCK": 64, "BLOCK_S": 64, "PRECISION": "tf32", **dims,
                      **selected.dkv_rows(group, tiles), "CHUNK": tiles.chunk,
                      "BLOCK_DK": max(16, next_power_of_2(dims["DQK"])), "HAS_GATE": True,
                      "DQ": tiles.fuses_dq(group)},
                     tiles.dkv_num_warps, tiles.dkv_num_stages, pointer_types=DKDV_GATES)


def selected_query_cases(tiles: SelectedTiles, group: int, dims: dict[str, int], rows: int, suffix: str = ""
                         ) -> Iterator[KernelCase]:
    """The selection forward and dq as their launchers run them under ``tiles`` with programs of ``rows`` rows
    (``query_tile_shape``: one token, or several walking the union of their blocks; 64-key blocks, n = 16)."""
    query: dict[str, Any] = {"GROUP": group, "SEL_BLOCK": 64, "BLOCK_S": 64, "PRECISION": "tf32", **dims,
                             **selected.query_tile_shape(group, rows), "NUM_SELECTED": 16, "NP": 16, "HAS_GATE": True,
                             "ACCUMULATE": True, "FORCED": 0}
    query["UNION"] = query["BQ"] * 16
    tma, tma_types = descriptor_args(tiles.tma, 64, dims)
    yield KernelCase(f"fwd_sel{suffix}", selected._sel_fwd_kernel, {**query, **tma},
                     *warps_stages(selected.query_launch(tiles, query, dq=False)), pointer_types=tma_types)
    yield KernelCase(f"dq_sel{suffix}", selected._sel_dq_kernel, {**query, **tma},
                     *warps_stages(selected.query_launch(tiles, query, dq=True)), pointer_types=tma_types)


def candidate_cases(shape_name: str) -> Iterator[KernelCase]:
    """The range kernels and the selection forward, dq and dk/dv under each of bench_prefill's tile candidates at
    this shape (``tile_variants``; the defaults first), named <kernel>#<candidate index>."""
    from bench.bench_prefill import SHAPES, tile_variants

    shape = SHAPES[shape_name]
    dims, group = split_dims(shape.dk, shape.dv), shape.heads // shape.kv_heads
    variants = tile_variants(shape_name)
    for field, branch in (("cmp_tiles", "cmp"), ("win_tiles", "win")):
        for index, tiles in enumerate(variants[field]):
            yield from range_cases(branch, tiles, group, dims, f"#{index}")
    for index, sel_tiles in enumerate(variants["sel_tiles"]):
        yield from selected_query_cases(sel_tiles, group, dims, sel_tiles.rows, f"#{index}")
        yield from selected_dkdv_cases(sel_tiles, group, dims, f"#{index}")


def cases(head_dim: int, head_dim_v: int, group: int = 16, range_tiles: dict[str, RangeTiles] | None = None,
          sel_tiles: SelectedTiles | None = None) -> Iterator[KernelCase]:
    """Every prefill kernel with the constexprs and launch settings the launchers use at this shape (or under the
    given tiles, per range branch "cmp" / "win": bench_prefill's tile candidates are checked here before a device
    run)."""
    dims = split_dims(head_dim, head_dim_v)
    for branch in RULES:
        tiles = (range_tiles or {}).get(branch) or tiles_for(max(head_dim, head_dim_v), branch, group)
        yield from range_cases(branch, tiles, group, dims)
    cmp = (range_tiles or {}).get("cmp") or tiles_for(max(head_dim, head_dim_v), "cmp", group)
    # the compression dk/dv's steps over one head's tokens (dkv_head_rows off: wide heads, or groups above dkv_m)
    yield from (case for case in range_cases("cmp", cmp._replace(dkv_head_rows=False, dkv_m=32), group, dims, "_1h")
                if case.name.startswith("dkdv"))
    topn_tiles = topn_tiles_for(group, head_dim)
    shape = topn_tile_shape(BLOCKS["num_selected"], group, BLOCKS["sel_block_size"], BLOCKS["block_stride"],
                            topn_tiles.rows, topn_tiles.key_blocks)
    topn_constexprs = {"GROUP": group, "CMP_BLOCK": BLOCKS["block_size"], "CMP_STRIDE": BLOCKS["block_stride"],
                       "SEL_BLOCK": BLOCKS["sel_block_size"], "SPILL": 1, "NUM_SELECTED": BLOCKS["num_selected"],
                       "OUT_WIDTH": 16, "PRECISION": "tf32", "DQK": head_dim, "D1": dims["D1"], "D2": dims["D2"],
                       "DEPTH": topn_tiles.depth_for(BLOCKS["num_selected"]), **shape}
    # the compressed keys as launched (through descriptors where topn_tiles.tma), then the other way; lists
    # shallower than n - 3 (the kernel also holds the exact merge it falls back on)
    for name, keys_tma, depth in (("topn", topn_tiles.tma, topn_constexprs["DEPTH"]),
                                  ("topn_other", not topn_tiles.tma, topn_constexprs["DEPTH"]),
                                  ("topn_shallow", topn_tiles.tma, 4)):
        keys, key_types = descriptor_args(keys_tma, shape["NS"] * shape["RATIO"], dims, values=False)
        yield KernelCase(name, topn._topn_kernel, {**topn_constexprs, **keys, "DEPTH": depth}, topn_tiles.num_warps,
                         topn_tiles.num_stages, pointer_types=key_types)
    sel_tiles = sel_tiles or SelectedTiles()
    gp = max(16, next_power_of_2(group))
    sel = {"GROUP": group, "GP": gp, "SEL_BLOCK": 64, "BLOCK_S": 64, "PRECISION": "tf32", **dims}
    tma, tma_types = descriptor_args(sel_tiles.tma, 64, dims)
    # fwd / dq as launched, and with 4 tokens x G = 4 per program, walking the union of their blocks
    yield from selected_query_cases(sel_tiles, group, dims, sel_tiles.rows)
    yield from selected_query_cases(sel_tiles, 4, dims, 16, "_g4")
    # the forced blocks apart (SelectedTiles.forced_apart): one token's other blocks, then the forced blocks' programs
    one_token: dict[str, Any] = {**sel, **selected.query_tile_shape(group, 0), "NUM_SELECTED": 16, "NP": 16,
                                 "UNION": 16, "HAS_GATE": True, "ACCUMULATE": True, **tma}
    yield KernelCase("fwd_sel_partial", selected._sel_fwd_kernel, {**one_token, "FORCED": 1},
                     *warps_stages(selected.query_launch(sel_tiles, one_token, dq=False)), pointer_types=tma_types)
    forced_shape = selected.forced_tile_shape(group, sel_tiles)
    forced = {**one_token, **forced_shape, "UNION": forced_shape["BQ"] * 16, "FORCED": 2}
    forced_launch = warps_stages(selected.forced_launch(sel_tiles))
    yield KernelCase("fwd_sel_forced", selected._sel_fwd_kernel, forced, *forced_launch, pointer_types=tma_types)
    yield KernelCase("dq_sel_forced", selected._sel_dq_kernel, forced, *forced_launch, pointer_types=tma_types)
    # dk/dv as launched, and at G = 4 (8 entries x 4 heads per step) with the dq inside (its default there) and
    # without
    yield from selected_dkdv_cases(sel_tiles, group, dims)
    yield from selected_dkdv_cases(sel_tiles._replace(fused_dq_max_group=0), 4, dims, "_g4")
    yield from selected_dkdv_cases(sel_tiles._replace(fused_dq_max_group=4), 4, dims, "_g4_dq")
    # the two slot reductions at G = 4, n = 16, as launched: the dq shares' sum, the block forward's combination
    slots = selected.slot_launch(4, 16)
    yield KernelCase("dq_reduce_sel_g4", selected._sel_dq_reduce_kernel,
                     {"GROUP": 4, "GP": slots["GP"], "NSP": slots["NSP"], "NUM_SELECTED": 16, "DQK": dims["DQK"],
                      "D1": dims["D1"], "D2": dims["D2"], "ACCUMULATE": True}, slots["num_warps"], 1)
    yield KernelCase("delta_sel", selected._row_delta_kernel, {"DV": dims["DV"], "BLOCK_DV": dims["BLOCK_DV"],
                                                               "ROWS": 128}, 4, 1)
    # the forward over the blocks' token lists at G = 4 (SelectedTiles.forwards_by_block) and its combination
    parts = (("part_lse_ptr", "*fp32"),)
    yield KernelCase("fwd_sel_part_g4", selected._sel_fwd_part_kernel,
                     {"GROUP": 4, "SEL_BLOCK": 64, "BLOCK_S": 64, "CHUNK": sel_tiles.chunk, "PRECISION": "tf32",
                      **dims, **selected.dkv_rows(4, sel_tiles)}, sel_tiles.dkv_num_warps, sel_tiles.dkv_num_stages,
                     pointer_types=parts)
    yield KernelCase("fwd_sel_combine_g4", selected._sel_fwd_combine_kernel,
                     {"GROUP": 4, "GP": slots["GP"], "NSP": slots["NSP"], "NUM_SELECTED": 16, "DV": dims["DV"],
                      "BLOCK_DV": dims["BLOCK_DV"], "HAS_GATE": True, "ACCUMULATE": True}, slots["num_warps"], 1,
                     pointer_types=parts)
    # the dk/dv reduction writing dk / dv, and adding into the float32 sums of earlier token ranges (the dq inside)
    reduce = {"SEL_BLOCK": 64, "BLOCK_S": 64, "DQK": head_dim, "BLOCK_DK": next_power_of_2(head_dim), "DV": head_dim_v,
              "BLOCK_DV": dims["BLOCK_DV"]}
    yield KernelCase("reduce_sel", selected._sel_reduce_kernel, {**reduce, "ACCUMULATE": False}, 8, 1)
    yield KernelCase("reduce_sel_add", selected._sel_reduce_kernel, {**reduce, "ACCUMULATE": True}, 8, 1,
                     pointer_types=(("dk_ptr", "*fp32"), ("dv_ptr", "*fp32")))


DECODE_POINTERS = (("scores_ptr", "*fp32"), ("keys_ptr", "*i64"), ("ref_ptr", "*fp32"), ("terms_ptr", "*fp32"),
                   ("m_ptr", "*fp32"), ("l_ptr", "*fp32"), ("acc_ptr", "*fp32"), ("pos_ptr", "*i64"),
                   ("idx_ptr", "*i64"), ("reads_ptr", "*i64"), ("count_ptr", "*i32"), ("page_table_ptr", "*i32"))


def decode_cases(tiles: Any = None) -> Iterator[KernelCase]:
    """The decode step's kernels at the public shape (HQ = 64, H_kv = 4, D = 128, paper blocks) with the constants
    a batch of 32 sequences at 128k launches them with (9 compressed splits of 8 tiles), paged and not."""
    tiles = tiles or decode.DecodeTiles()
    splits, block_out = 9, 16
    sel_programs = cdiv(BLOCKS["num_selected"], tiles.sel_blocks)
    window_tiles = cdiv(BLOCKS["window_size"], decode.BLOCK_W * tiles.sel_blocks)
    heads = {"HKV": 4, "G": 16, "BLOCK_G": 16}
    blocks = {"CMP_BLOCK": BLOCKS["block_size"], "CMP_STRIDE": BLOCKS["block_stride"]}
    select = {"HKV": 4, "SEL_BLOCK": BLOCKS["sel_block_size"], "NUM_SELECTED": BLOCKS["num_selected"],
              "BLOCK_OUT": block_out}
    shape = decode.cmp_tile_shape(NSASizes(**BLOCKS), tiles.cmp_block)
    eq9 = {"BLOCK_Q": shape.block_q, "SPILL": shape.spill}
    dims = {"DK": 128, "DV": 128, "BLOCK_DK": 128, "BLOCK_DV": 128}

    def case(name: str, fn: Any, constexprs: dict[str, Any], num_warps: int = 4, num_stages: int = 3) -> KernelCase:
        return KernelCase(name, fn, constexprs, num_warps, num_stages, pointer_types=DECODE_POINTERS)

    yield case("dec_cmp", decode._cmp_partials_kernel,
               {**heads, **blocks, **dims, **eq9, "SEL_BLOCK": BLOCKS["sel_block_size"], "BLOCK_R": shape.block_r,
                "TILES_PER_SPLIT": 8}, tiles.cmp_warps, tiles.cmp_stages)
    yield case("dec_scores", decode._split_top_blocks_kernel,
               {"HKV": 4, "G": 16, "BLOCK_G": 16, **eq9, "NUM_SPLITS": splits, "TILES_PER_SPLIT": 8, "CHUNK": 16,
                "SEL_BLOCK": BLOCKS["sel_block_size"], "LOCAL_TOP": block_out}, tiles.scores_warps)
    yield case("dec_topn", decode._select_topn_kernel,
               {**select, "NUM_KEYS": splits * block_out, "BLOCK_KEYS": 256})
    for page in (0, 256):
        yield case(f"dec_selwin{page}", decode._sel_win_partials_kernel,
                   {**heads, **dims, "NUM_SELECTED": BLOCKS["num_selected"], "SEL_BLOCK": BLOCKS["sel_block_size"],
                    "WINDOW": BLOCKS["window_size"], "BLOCK_SEL": 64, "BLOCK_W": decode.BLOCK_W, "PAGE": page,
                    "PER_PROGRAM": tiles.sel_blocks, "NUM_SEL_PROGRAMS": sel_programs})
    yield case("dec_combine", decode._combine_kernel,
               {**heads, **dims, "NUM_SPLITS": splits, "NUM_SEL_SLOTS": sel_programs, "NUM_WIN_TILES": window_tiles,
                "BLOCK_SLOTS": 64, "CMP_CHUNK": 16, "SEL_CHUNK": 8, "WIN_CHUNK": 4},
               tiles.combine_warps)


def row_cases() -> Iterator[KernelCase]:
    """The non-finite rule's row passes (nsa.kernels.rows) over 128-wide bf16 vectors, and the layer's guard."""
    blocks = row_passes._blocks(128)
    types = (("flags_ptr", "*i8"),)
    yield KernelCase("nonfinite_rows", row_passes._nonfinite_rows_kernel, blocks, 4, 3, pointer_types=types)
    yield KernelCase("fill_rows", row_passes._fill_rows_kernel, {**blocks, "FILL_NAN": True}, 4, 3,
                     pointer_types=types)
    yield KernelCase("pair_flags", row_passes._pair_flags_kernel, blocks, 4, 3, pointer_types=(("counts_ptr", "*i32"),))
    # the public shape's guard: 16 selected blocks, G = 16, packed sequences (int64 positions)
    yield KernelCase("guard_rows", row_passes._guard_rows_kernel,
                     {"PACKED": True, "BLOCK_T": row_passes.GUARD_TOKENS, "BLOCK_N": 16,
                      "HEADS": row_passes.GUARD_HEADS, **row_passes._row_tile(128, "BLOCK_DQ", row_passes.GUARD_TOKENS),
                      **row_passes._row_tile(3, "BLOCK_DG", row_passes.GUARD_TOKENS)}, 4, 3,
                     pointer_types=(("counts_ptr", "*i32"), ("indices_ptr", "*i32"), ("out_ptr", "*i8"),
                                    ("token_start_ptr", "*i64"), ("block_start_ptr", "*i64"), ("position_ptr", "*i64")))


def union_cases() -> Iterator[KernelCase]:
    """The selection's query-tile unions (nsa.kernels.selected.query_tiles) at n = 16, as the GPT's G = 2 (8
    tokens per program) and G = 4's short programs (16 tokens) launch them: Triton's default 4 warps, 3 stages."""
    for tokens in (8, 16):
        yield KernelCase(f"union_{tokens}", selected._query_union_kernel,
                         {"NUM_SELECTED": 16, "NP": 16, "BQ": tokens, "UNION": tokens * 16}, 4, 3)


def compile_case(case: KernelCase, arch: int = 90) -> Any:
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(case.fn.arg_names)
                 if name.startswith("stride") or name.endswith("_ptr")}
    signature = _signature(case.fn, case.constexprs, case.float32_outputs, case.pointer_types)
    source = triton.compiler.ASTSource(case.fn, signature, case.constexprs, divisible)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def resource_usage(kernel: Any) -> str:
    """ptxas' registers / stack / shared memory line for a compiled kernel (cuobjdump ships with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    return next((line.strip() for line in report.splitlines() if "REG:" in line), "?")


def sass(kernel: Any) -> list[str]:
    """A compiled kernel's SASS, line by line (nvdisasm ships with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, "-c", cubin.name], capture_output=True, text=True).stdout.splitlines()


def loop_spills(lines: list[str]) -> list[int]:
    """Local-memory loads and stores (LDL / STL: spilled registers) inside each loop of a kernel's SASS ``lines``
    that holds a matmul (HGMMA / HMMA), one count per loop in the order the loops start (an outer loop counts its
    inner loops' too): ptxas' stack size does not say whether the spills sit on a loop's path. A loop is a branch
    back to a label above it."""
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    counts = []
    for end, line in enumerate(lines):
        target = line.split("BRA `(")[-1].split(")")[0] if "BRA `(" in line else ""
        start = labels.get(target, end)
        body = lines[start:end]
        if start < end and any("MMA" in text for text in body):
            counts.append((start, sum(" STL" in text or " LDL" in text for text in body)))
    return [count for _, count in sorted(counts)]


def loop_loads(ttgir: str) -> list[str]:
    """The synchronous loads (``tt.load``) inside the loops of a kernel's TTGIR, as their result types: what
    Triton's software pipelining left on a step's path (a pipelined load is an async copy a step ahead; TMA loads
    are descriptor loads). A scalar one may be a value read a step ahead by hand (the selection's next block)."""
    found: list[str] = []
    loops: list[int] = []  # the indentation of each open scf.for
    for line in ttgir.splitlines():
        text = line.lstrip()
        indent = len(line) - len(text)
        if loops and indent == loops[-1] and text.startswith("}"):
            loops.pop()
        elif " scf.for " in line and text.rstrip().endswith("{"):
            loops.append(indent)
        elif loops and " tt.load " in line:
            found.append(line.rsplit(" : ", 1)[-1].split(" loc(")[0].strip())
    return found


def main(argv: list[str] | None = None) -> None:
    from bench.bench_prefill import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, choices=ARCHES, metavar="ARCH",
                        help=f"compute capability, one of {', '.join(map(str, ARCHES))} (default 90)")
    parser.add_argument("--head-dims", nargs="+", type=positive_int, action=Distinct,
                        help="default: 128 and 192 (not with --candidates, whose shapes fix them)")
    parser.add_argument("--loop-loads", action="store_true",
                        help="also list each kernel's synchronous loads inside its loops (loop_loads)")
    parser.add_argument("--loop-spills", action="store_true",
                        help="also count the spills' local loads / stores inside each loop that holds a matmul "
                        "(loop_spills, from the SASS)")
    parser.add_argument("--candidates", nargs="+", default=[], metavar="SHAPE", choices=list(SHAPES), action=Distinct,
                        help="instead: the range kernels and the selection forward, dq and dk/dv under each tile "
                        "candidate of bench_prefill's sweep at these shapes (public, paper, g4, g12, gpt, g4_paper)")
    args = parser.parse_args(argv)
    if args.candidates and args.head_dims:
        parser.error("--candidates compiles at its shapes' head dims: --head-dims would do nothing")

    def report(label: str, case: KernelCase) -> None:
        kernel = compile_case(case, args.arch)
        extra = f" loop loads: {loop_loads(kernel.asm['ttgir'])}" if args.loop_loads else ""
        extra += f" loop spills: {loop_spills(sass(kernel))}" if args.loop_spills else ""
        usage = resource_usage(kernel)
        print(f"{label} {case.name:14s} warps={case.num_warps} stages={case.num_stages} {usage}{extra}")

    if args.candidates:
        for shape_name in args.candidates:
            for case in candidate_cases(shape_name):
                report(f"{shape_name:8s}", case)
        return
    for head_dim in args.head_dims or [128, 192]:
        for case in cases(head_dim, 128 if head_dim == 192 else head_dim, group=12 if head_dim == 192 else 16):
            report(f"d={head_dim:3d}", case)
    for case in decode_cases():
        report("decode", case)
    for case in row_cases():
        report("rows  ", case)
    for case in union_cases():
        report("union ", case)


if __name__ == "__main__":
    main()
