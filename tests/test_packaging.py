"""The installed package is the product: the pytest plugin is a good citizen, the sweeps run from an installed
wheel in an empty directory, user mistakes give one line and exit 2 (never a traceback), and the repository
holds no binaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=600, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_plugin_is_opt_in_and_leaves_other_projects_alone(tmp_path):
    """A project with its own --device option, in an environment where pykernels is installed: its pytest run
    passes, and pykernels (and torch) are never imported into it."""
    (tmp_path / "conftest.py").write_text(
        "import sys\n"
        "def pytest_addoption(parser):\n"
        "    parser.addoption('--device', default='x')\n"
        "    parser.addoption('--backend', default='y')\n"
        "def pytest_sessionfinish(session):\n"
        "    assert 'pykernels' not in sys.modules and 'torch' not in sys.modules, 'imported into a foreign run'\n")
    (tmp_path / "test_mine.py").write_text("def test_it(request):\n    assert request.config.getoption('device') == 'z'\n")
    r = _run([sys.executable, "-m", "pytest", "-q", "--device", "z", "-p", "no:cacheprovider"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout


def test_plugin_options_carry_the_prefix():
    import pykernels.pytest_plugin as plugin

    class Group:
        def __init__(self):
            self.names = []

        def addoption(self, *names, **kw):
            self.names += names

    class Parser:
        g = Group()

        def getgroup(self, *a, **k):
            return self.g

    p = Parser()
    plugin.pytest_addoption(p)
    # the one exception is the entry word --benchmark, an alias of --pk-bench
    assert p.g.names and all(n.startswith("--pk-") or n == "--benchmark" for n in p.g.names), p.g.names


def _cli(*args, cwd=None, timeout=300):
    return _run([sys.executable, "-m", "pykernels.cli", *args], cwd or REPO, timeout=timeout)


def _one_line_usage_error(r, needle):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-2000:])
    assert "Traceback" not in r.stdout + r.stderr
    assert needle in err, err


@pytest.mark.parametrize("args, needle", [
    (("validate", "--backend", "nope", "--no-perf"), "unknown backend 'nope'"),
    (("validate", "--backend", "triton", "--no-perf"), "unavailable"),           # no GPU here
    (("validate", "--backend", "native", "--device", "tpu", "--no-perf"), "--device"),
    (("info", "--device", "tpu"), "--device"),
    (("info", "--dtype", "int8", "--peaks"), "--dtype"),
    (("bench", "--dtype", "int8"), "--pk-dtype"),
    (("bench", "--device", "tpu"), "--pk-device"),
    (("bench", "--backend", "nope"), "unknown backend(s) nope"),
    (("bench", "--shape", "M=4,N=0,K=3"), "N=0 must be >= 1"),
    (("bench", "--shape", "X=1"), "name no family"),
    (("bench", "--shape", "M=4,N=4,K=3,layout=tn"), "'layout' must be one of nn, nt, got 'tn'"),
])
def test_usage_errors_exit_2_with_one_line(args, needle, tmp_path):
    if args[:3] == ("validate", "--backend", "triton"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("the triton backend is available on this machine")
    _one_line_usage_error(_cli(*args, cwd=tmp_path), needle)


def test_cuda_device_without_cuda_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    _one_line_usage_error(_cli("info", "--device", "cuda", cwd=tmp_path), "no cuda device")
    _one_line_usage_error(_cli("bench", "--device", "cuda", cwd=tmp_path), "no cuda device")


def test_bench_that_measures_nothing_fails_and_says_why(tmp_path):
    # numpy has no bfloat16: every case is skipped
    r = _cli("bench", "--sweep", "smoke", "--backend", "numpy", "--dtype", "bfloat16", "--kernel", "gemm",
             "--journal", str(tmp_path / "a b" / "j.jsonl"), cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "no case was measured" in r.stdout and "does not support dtype bfloat16" in r.stdout


def test_bench_from_any_directory_with_journal_and_model_paths(tmp_path):
    """From a directory that is not the repository, with a journal path and a model file given as separate
    arguments (which made pytest take their directory as rootdir): the sweep runs, with pykernels' own
    configuration (not the repository's filterwarnings=error: --benchmark-compare without a saved run warns)."""
    d = tmp_path / "some dir"
    d.mkdir()
    model = REPO / "pykernels" / "tokens" / "models" / "tiny.json"
    out = d / "out.json"
    r = _cli("bench", "--model", str(model), "--kernel", "gemm", "--dtype", "float32", "--backend", "numpy",
             "--time-budget", "0.01", "--journal", str(d / "j.jsonl"), "--json", str(out),
             "--", "--benchmark-compare", "--benchmark-storage", f"file://{d / 'store'}", cwd=d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "pykernels speedup table" in r.stdout
    assert out.exists() and (d / "j.jsonl").exists()
    import json

    doc = json.loads(out.read_text())
    assert doc["benchmarks"] and all(b["extra_info"]["backend"] == "numpy" for b in doc["benchmarks"])


def test_bench_custom_shape(tmp_path):
    import json

    r = _cli("bench", "--shape", "M=33,N=17,K=65", "--shape", "M=33,N=17,K=65,layout=nt",
             "--shape", "B=2,Hq=4,Hkv=2,L=40,D=64,paged=1,block_size=16",
             "--backend", "torch", "--dtype", "float32", "--time-budget", "0.01", "--journal", str(tmp_path / "j"),
             "--json", str(tmp_path / "o.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    shapes = {b["extra_info"]["shape"] for b in json.loads((tmp_path / "o.json").read_text())["benchmarks"]}
    assert shapes == {"M33-N17-K65", "M33-N17-K65-nt", "B2-Hq4-Hkv2-L40-D64-paged16"}, shapes


def test_bench_many_shapes_default_journal(tmp_path, monkeypatch):
    """The default journal is named after the sweep; with many --shape options that name outgrew a file name (255
    bytes: OSError on every case). Now it is cut and carries a hash of the whole sweep, so two sweeps that share
    the first 80 characters keep separate journals."""
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    shapes = [f"M={m},N=17,K=65" for m in range(100, 118)]  # a sweep name of ~300 characters
    args = [a for sh in shapes for a in ("--shape", sh)]
    for extra in ([], ["--shape", "M=5,N=5,K=5"]):
        r = _cli("bench", *args, *extra, "--backend", "numpy", "--dtype", "float32", "--time-budget", "0.01",
                 cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "cache").glob("journal-*.jsonl"))
    assert len(names) == 2 and all(len(n) < 255 for n in names), names


def test_tokens_without_the_needed_shapes_is_not_green(tmp_path):
    import json

    (tmp_path / "r.json").write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
    r = _run([sys.executable, "-m", "pykernels.tokens", str(tmp_path / "r.json"), "--model", "tiny"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def test_validate_labels_partial_runs(tmp_path):
    r = _cli("validate", "--backend", "numpy", "--no-perf", "--quick", "--out", str(tmp_path), cwd=tmp_path,
             timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[partial: quick matrix, no performance section]" in r.stdout
    md = next(tmp_path.glob("validate-numpy-cpu.md")).read_text()
    assert "(partial: quick matrix, no performance section)" in md


# ---------------------------------------------------------------------------------------------------
# the repository


def _tracked():
    r = _run(["git", "ls-files", "-z"], REPO)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / p for p in r.stdout.split("\0") if p]


def test_repository_holds_no_binaries():
    bad = []
    for p in _tracked():
        if not p.is_file():
            continue
        if p.suffix in (".whl", ".so", ".o", ".a", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".exe", ".dll", ".pyd"):
            bad.append(f"{p.relative_to(REPO)} (binary suffix)")
        elif p.suffix != ".png" and b"\0" in p.read_bytes()[:8192]:
            bad.append(f"{p.relative_to(REPO)} (binary content)")
        elif p.stat().st_size > (4 << 20):
            bad.append(f"{p.relative_to(REPO)} ({p.stat().st_size >> 20} MB)")
    assert not bad, bad


# Built from parts so that this file does not contain what it looks for.
_OUTSIDE = (".." + "/shared", "DESIGN" + ".md")


def test_docs_stand_alone():
    """Docs point to the repository's own design document, never to one outside it."""
    bad = []
    for p in _tracked():
        if p.suffix not in (".md", ".py", ".sh", ".toml", ".cpp", ".cu", ".h", ".cuh") or not p.is_file():
            continue
        txt = p.read_text(errors="replace")
        if any(s in txt for s in _OUTSIDE):
            bad.append(str(p.relative_to(REPO)))
    assert not bad, bad
    assert (REPO / "docs" / "design.md").is_file()


@pytest.mark.slow
def test_wheel_runs_the_smoke_sweep_from_an_empty_directory(tmp_path):
    """Build the wheel, install it on its own (no source tree, no editable hooks: `python -S` with only the
    wheel's directory and the environment's site-packages on the path) and run the smoke sweep from an empty
    directory."""
    import site
    import sysconfig

    wheels = tmp_path / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(REPO),
              "-C", f"build-dir={tmp_path / 'build'}", "-C", "cmake.define.PYKERNELS_CUDA=OFF"], tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = wheels.glob("pykernels-*.whl")
    target = tmp_path / "site"
    r = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(whl)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = [str(target), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *site.getsitepackages()]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYKERNELS_CACHE_DIR": str(tmp_path / "cache")}
    probe = _run([sys.executable, "-S", "-c", "import pykernels, pykernels.bench; print(pykernels.__file__)"],
                 empty, env=env)
    assert probe.returncode == 0 and probe.stdout.startswith(str(target)), probe.stdout + probe.stderr
    r = _run([sys.executable, "-S", "-m", "pykernels.cli", "bench", "--sweep", "smoke", "--backend", "native",
              "--backend", "torch", "--kernel", "gemm", "--time-budget", "0.01", "--json", "out.json"], empty, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (empty / "out.json").exists() and "pykernels speedup table" in r.stdout


def test_ruff_is_clean():
    import shutil

    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = _run([ruff, "check", "--no-cache", "."], REPO)
    assert r.returncode == 0, r.stdout[-4000:]
