"""Shared test helpers: deterministic random tensors, hypothesis profile, shape strategies, the prefill tiles'
override, the interpreter's bf16 dot fixture, its speed-ups (language patching once per launch, no dead work) and
the tests' calls from a large frame (CPython 3.11's frame chunks).

Test modules import the helpers directly (``from conftest import ...``); pytest puts tests/ on
sys.path (rootdir-relative "prepend" import mode, tests/ has no __init__.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_decode_triton.py). The
# variable must be set before any kernel module is imported; the dispatch never picks the
# interpreter on its own (only an explicit backend="triton" does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Derandomized: the same examples on every run and machine (no flaky tests). 25 examples per
# property keeps the CPU suite within its budget; `HYPOTHESIS_PROFILE=nsa-deep` explores more.
settings.register_profile(
    "nsa",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "nsa-deep",
    derandomize=True,
    deadline=None,
    max_examples=300,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nsa"))


class PrefillConfig(NamedTuple):
    """One drawn setting of the NSA prefill layer (tests/test_nsa_prefill.py's strategy on the interpreter's tiles,
    tests/test_nsa_prefill_gpu.py's on the GPU's): the inputs' sizes, and whether the lengths are packed
    (cu_seqlens, batch 1) or one length for every batch row."""

    batch: int
    lengths: list[int]
    packed: bool
    heads: int
    kv_heads: int
    dk: int
    dv: int
    blocks: dict


def patch_the_language_once_per_launch() -> None:
    """Triton 3.6's interpreter patches triton.language for the interpreter at each launch, then again at every
    call of a device function inside it (~1 ms each: ``inspect.getmembers`` over the modules; ~20% of a kernel
    test's time). Within a launch a module stays patched once patched (the launch's scope restores its own
    patches when it ends; a device function's are never restored), so inside a launch a device function whose
    modules are all patched already gets an empty scope instead. Every other call patches as before: what runs
    is unchanged, only the repeated work goes."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: set[int] | None = None  # the modules the launch in progress patched; None between launches

    modules_of: dict[Any, set[int]] = {}  # per function: which of tl, tl.core its module holds (a scan of its globals)

    def patch_once(fn: Any) -> Any:
        if fn not in modules_of:
            modules_of[fn] = {id(value) for value in fn.__globals__.values()
                              if inspect.ismodule(value) and value in (tl, tl.core)}
        modules = modules_of[fn]
        if patched and modules <= patched:  # empty at the launch's own call, which always patches
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if patched is not None:
            patched.update(modules)
        return scope

    def launch_patching_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal patched
        patched = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched = None

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_patching_once


def skip_the_interpreters_dead_work() -> None:
    """Two more speed-ups of Triton 3.6's interpreter that change no result and drop no check (a decode kernel test
    26.8 -> 17.5 s, ~6 s of it the sanitizer's):
    - Every int32 add / sub / mul is re-done in int64 and compared with the type's range for an overflow assert
      that the interpreter never raises: its options have ``debug=False``, and ``device_assert`` returns at once
      then. A GPU build without debug drops the same check (its int64 ops are dead code there).
    - ``_get_np_dtype`` builds a 20-entry dict of dtypes at every call (hundreds of thousands per test); the
      numpy dtype of each element type is now looked up once."""
    import dataclasses

    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    if not builder.options.debug:  # with debug on, the sanitizer's asserts would fire: keep it then
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)

    np_dtype_of = interpreter._get_np_dtype
    by_element: dict[Any, np.dtype] = {}

    def cached_np_dtype(tt_dtype: Any) -> np.dtype:
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):
            return np.dtype(np.uint64)
        if element not in by_element:
            by_element[element] = np_dtype_of(element)
        return by_element[element]

    interpreter._get_np_dtype = cached_np_dtype


if os.environ.get("TRITON_INTERPRET") == "1":
    patch_the_language_once_per_launch()
    skip_the_interpreters_dead_work()


def in_a_frame_of(num_slots: int) -> Callable[[Callable[[], Any]], Any]:
    """A function that returns ``call()`` from a frame of ``num_slots`` (unassigned) local slots.

    Why: CPython 3.11 keeps a thread's frames in chunks of 16 KB and unmaps a chunk the moment the frame at its
    base returns (``_PyThreadState_PopFrame``), mapping a fresh one at the next call that crosses the boundary.
    Triton's interpreter runs a few dozen nested Python calls per tl op; where they straddle a boundary, every op
    maps and unmaps pages: 2.2M mmap / munmap pairs in one kernel test run alone (55 s, 24 of them system time;
    22 s from a large frame). Under two xdist workers, whose depths differ, tests/test_nsa_prefill.py took 270 s
    with 28 s of system time, and 256 s with 2 from a large frame. A frame larger than a chunk gets a chunk of its
    own with room to spare, and the test's frames fit in that room: no boundary within reach (a decode kernel
    test then maps 12k times, not millions)."""
    names = " = ".join(f"_{i}" for i in range(num_slots))
    namespace: dict[str, Any] = {}
    exec(f"def call_in_a_large_frame(call):\n    if call is None:\n        {names} = None\n    return call()\n",
         namespace)
    return namespace["call_in_a_large_frame"]


_in_a_large_frame = in_a_frame_of(66_000)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> object:
    """pytest's own test call, from a large frame (``in_a_frame_of``): no test's speed depends on its stack depth."""
    from _pytest.python import pytest_pyfunc_call as call_the_test

    return _in_a_large_frame(lambda: call_the_test(pyfuncitem))


F64 = torch.float64
# float64 comparisons: every op here is O(T * D) sums of O(1) terms, so the rounding error of either
# side is ~1e-15; 1e-10 leaves five orders of magnitude of slack and still catches any real bug.
TOL64: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10}


def randn(*shape: int, seed: int, dtype: torch.dtype = F64, scale: float = 1.0) -> torch.Tensor:
    """Deterministic standard-normal tensor (float64 by default), generated on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Deterministic uniform [0, 1) tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=F64).to(dtype)


@pytest.fixture
def make_randn():
    """Factory fixture: make_randn(*shape, seed=..., dtype=...) -> deterministic normal tensor."""
    return randn


@dataclass(frozen=True)
class Shape:
    """One NSA problem size. l = block_size, d = block_stride, lp = sel_block_size."""

    B: int
    T: int
    HQ: int
    Hkv: int
    Dk: int
    Dv: int
    l: int
    d: int
    lp: int
    n: int
    w: int
    seed: int

    @property
    def G(self) -> int:
        return self.HQ // self.Hkv

    def kw(self) -> dict:
        """Keyword arguments of nsa_attention / select_blocks for this shape."""
        return {
            "block_size": self.l,
            "block_stride": self.d,
            "sel_block_size": self.lp,
            "num_selected": self.n,
            "window_size": self.w,
        }


# (l, d, l') with d | l and d | l': overlapping and non-overlapping compression, l < l', l = l',
# l > l', odd sizes, the paper's 32/16/64 proportions scaled down (4/2/8, 8/4/16).
BLOCK_CONFIGS = [
    (4, 2, 4),
    (4, 2, 8),
    (8, 4, 16),
    (8, 4, 4),
    (4, 4, 4),
    (2, 1, 2),
    (6, 2, 4),
    (6, 3, 3),
    (3, 3, 6),
]


@st.composite
def shapes(draw, max_t: int = 40, groups=(1, 2, 3, 4), kv_heads=(1, 2), batch=(1, 2)) -> Shape:
    l, d, lp = draw(st.sampled_from(BLOCK_CONFIGS))
    # T: edge values first (1, around l and l'), then anything up to max_t.
    edge = sorted({1, 2, max(1, l - 1), l, l + 1, lp, lp + 1, 2 * lp + 1, max_t} - {0})
    t_len = draw(st.one_of(st.sampled_from([x for x in edge if x <= max_t]), st.integers(1, max_t)))
    hkv = draw(st.sampled_from(kv_heads))
    g = draw(st.sampled_from(groups))
    dk = draw(st.sampled_from([4, 6, 8]))
    dv = draw(st.sampled_from([2, 4, 5]))
    n = draw(st.integers(3, 7))
    w = draw(st.integers(1, max_t + 4))
    return Shape(
        B=draw(st.sampled_from(batch)),
        T=t_len,
        HQ=g * hkv,
        Hkv=hkv,
        Dk=dk,
        Dv=dv,
        l=l,
        d=d,
        lp=lp,
        n=n,
        w=w,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_raw_inputs(s: Shape, dtype: torch.dtype = F64) -> dict:
    """Raw (uncompressed) q, k, v for all three branches plus gates in (0, 1), for shape s."""
    seed = s.seed
    return {
        "q": randn(s.B, s.T, s.HQ, s.Dk, seed=seed, dtype=dtype),
        "k_c": randn(s.B, s.T, s.Hkv, s.Dk, seed=seed + 1, dtype=dtype),
        "v_c": randn(s.B, s.T, s.Hkv, s.Dv, seed=seed + 2, dtype=dtype),
        "k_sel": randn(s.B, s.T, s.Hkv, s.Dk, seed=seed + 3, dtype=dtype),
        "v_sel": randn(s.B, s.T, s.Hkv, s.Dv, seed=seed + 4, dtype=dtype),
        "k_win": randn(s.B, s.T, s.Hkv, s.Dk, seed=seed + 5, dtype=dtype),
        "v_win": randn(s.B, s.T, s.Hkv, s.Dv, seed=seed + 6, dtype=dtype),
        "gates": torch.sigmoid(randn(s.B, s.T, s.HQ, 3, seed=seed + 7)).to(dtype),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`pytest -m gpu` on a machine without CUDA: every gpu-marked test is skipped with the reason,
    instead of failing inside torch. With CUDA, the long_compile tests start the run, one per xdist worker: their
    minutes of compiling overlap the rest of the suite instead of ending it (xdist's load scheduling hands each
    worker two consecutive tests to start with, so they alternate with short ones; the order is the same on every
    worker, as xdist requires)."""
    if torch.cuda.is_available():
        long = [item for item in items if item.get_closest_marker("long_compile") is not None]
        short = [item for item in items if item.get_closest_marker("long_compile") is None]
        pairs = [item for pair in zip(long, short, strict=False) for item in pair]
        items[:] = pairs + long[len(pairs) // 2:] + short[len(pairs) // 2:]
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _release_cached_gpu_memory(request: pytest.FixtureRequest):
    """The GPU suite runs on 8 xdist workers sharing one GPU. PyTorch's caching allocator keeps what a finished
    test allocated reserved in its worker: at the end of one H100 run (80 GB, 322a4f3) the other workers held up to
    28.7 GB each, most of it cached for tests already done, and the last test's 32 MB allocation ran out of memory.
    Each GPU test hands its cache back when it ends."""
    yield
    if request.node.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_per_module():
    """FlexAttention compiles even when called eagerly. Graphs cached by one module (and the automatic
    dynamic shapes that its recompiles switch on) must not leak into the next: torch 2.13 then fails
    on score_mods whose captured tensors require grad (PendingUnbackedSymbolNotFound)."""
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """`pytest -m long`: the milestone smokes (tests/test_milestones.py), one line each with its outcome, so the
    run reads as the milestones' state."""
    smokes = sorted((report.nodeid.rpartition("::")[2], report.outcome)
                    for reports in terminalreporter.stats.values() for report in reports
                    if isinstance(report, pytest.TestReport) and "test_milestones.py::test_M" in report.nodeid
                    and (report.when == "call" or report.outcome != "passed"))
    if smokes:
        terminalreporter.section("milestones")
        for name, outcome in smokes:
            terminalreporter.write_line(f"{outcome.upper():8} {name}")


def use_prefill_tiles(monkeypatch: pytest.MonkeyPatch, *, ranges: dict[str, Any] | None = None,
                      selected: dict[str, Any] | None = None, topn: dict[str, Any] | None = None) -> None:
    """Run nsa.prefill's kernels under its default tiles with these RangeTiles (both range branches) /
    SelectedTiles / TopnTiles fields replaced."""
    from nsa import prefill

    make_tiles = prefill._tiles

    def tiles(device: torch.device, head_dim: int, group: int) -> prefill.PrefillTiles:
        made = make_tiles(device, head_dim, group)
        return made._replace(cmp=made.cmp._replace(**(ranges or {})), win=made.win._replace(**(ranges or {})),
                             sel=made.sel._replace(**(selected or {})), topn=made.topn._replace(**(topn or {})))

    monkeypatch.setattr(prefill, "_tiles", tiles)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton 3.6's interpreter stores bfloat16 as raw uint16 bits and its create_dot multiplies those bits
    as integers (only fp8 operands are converted; triton-lang/triton#11584), so any tl.dot on bfloat16 returns
    garbage on CPU. Convert bfloat16 operands to float32 first (exact; what the GPU's bf16 x bf16 -> fp32 MMA
    computes). No effect on a GPU, where the interpreter is not used. The interpreter still rounds float32 ->
    bfloat16 toward zero (one ulp, 2^-7, where the GPU rounds to nearest)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle: Any) -> Any:
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        a = as_float32(a) if a.dtype.scalar == tl.bfloat16 else a
        b = as_float32(b) if b.dtype.scalar == tl.bfloat16 else b
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def cli_refusal(main: Callable[..., object], capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    """Call a command line's ``main(*args)``, which must refuse its arguments as argparse does (exit status 2);
    -> what it wrote to stderr."""
    with pytest.raises(SystemExit) as refused:
        main(*args)
    assert refused.value.code == 2
    return capsys.readouterr().err
