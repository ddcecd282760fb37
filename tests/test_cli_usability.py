"""The command line as a new user meets it: --version, python -m, exit statuses, closed pipes, Ctrl-C, progress."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from mla_ref import __version__
from mla_ref.cli import EXIT_BROKEN_PIPE, EXIT_GOLDEN, EXIT_INTERRUPTED, EXIT_USAGE, exit_code, main
from mla_ref.errors import ConfigError, GoldenError, InputError, SpecError
from mla_ref.golden.cases import case_definitions
from mla_ref.progress import Progress
from mla_ref.spec import spec_version


def test_version_names_package_spec_and_golden(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"mla-ref {__version__}" and lines[1] == f"spec_version {spec_version()}"
    assert lines[2].startswith("golden ") and f"spec_version {spec_version()}, generator_version" in lines[2]


def test_version_without_a_golden_folder_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLA_REF_GOLDEN_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--version"])
    assert f"golden: none usable at {tmp_path} (manifest is missing" in capsys.readouterr().out


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "mla_ref", "info", "tiny"], capture_output=True, text=True)
    assert result.returncode == 0 and "softmax scale in use" in result.stdout


@pytest.mark.parametrize("error, status", [(GoldenError("g", "p", "G"), EXIT_GOLDEN), (SpecError("s", "p", "S"), EXIT_USAGE),
                                           (ConfigError("c", "p", "C"), EXIT_USAGE), (InputError("i", "p", "I"), EXIT_USAGE)])
def test_every_error_class_has_its_documented_status(error, status):
    assert exit_code(error) == status


def test_errors_are_one_line_on_stderr(tmp_path, capsys):
    assert main(["check", "mla_ref.conformance.reference_adapter", "--dir", str(tmp_path)]) == EXIT_GOLDEN
    assert main(["check", "mla_ref.conformance.reference_adapter", "--select", "mla.core", "--waivers", str(tmp_path / "no.yaml")]) == EXIT_USAGE
    assert main(["check", "mla_ref.conformance.reference_adapter", "--select", "mla.core.paged/tiny/bs16",
                 "--report", str(tmp_path / "missing" / "r.json")]) == EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("mla-ref: error: ") for line in err), err
    assert "manifest is missing" in err[0] and "mla-ref golden generate --dir DIR" in err[0] and "--waivers" in err[1] and "does not exist" in err[2]


def test_a_closed_pipe_ends_quietly():
    """``mla-ref explain MLA.13 | head -1``: no BrokenPipeError traceback, status 141 (as if killed by SIGPIPE)."""
    process = subprocess.Popen([sys.executable, "-m", "mla_ref", "golden", "verify", "--select", "mla.core"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader went away before the first line
    stderr = process.stderr.read().decode()
    assert process.wait() == EXIT_BROKEN_PIPE and stderr == "", stderr


def test_ctrl_c_exits_130_and_keeps_the_partial_report(tmp_path):
    slow = tmp_path / "slow_adapter.py"
    slow.write_text("import time\nfrom mla_ref.conformance.reference_adapter import latent_attention_core as _core\n"
                    "calls = []\n"
                    "def latent_attention_core(*args):\n"
                    "    calls.append(1)\n"
                    "    if len(calls) > 1:\n"
                    "        open(__file__ + '.waiting', 'w').close()\n"
                    "        time.sleep(60)\n"
                    "    return _core(*args)\n")
    report = tmp_path / "report.json"
    process = subprocess.Popen([sys.executable, "-m", "mla_ref", "check", str(slow), "--select", "mla.core", "--report", str(report)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "slow_adapter.py.waiting").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    core_cases = sum(definition["id"].startswith("mla.core") for definition in case_definitions())
    assert f"mla-ref: interrupted after 1 of {core_cases} cases" in stderr and "Traceback" not in stderr
    assert "1 passed, 0 failed" in stdout
    assert json.loads(report.read_text())["passed"] == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_erases_itself():
    stream = _Terminal()
    with Progress(stream, delay=0.0, interval=60) as progress:
        progress(0, 3, "mla.prefill/tiny/seed0")
        progress(1, 3, "moe.route.v3/tiny/seed0")
    text = stream.getvalue()
    assert "\r[0/3] mla.prefill/tiny/seed0  0 s" in text and "\r[1/3] moe.route.v3/tiny/seed0  0 s" in text
    assert text.endswith("\r" + " " * len("[1/3] moe.route.v3/tiny/seed0  0 s") + "\r")


@pytest.mark.parametrize("stream, quiet", [(io.StringIO(), False), (_Terminal(), True)])
def test_progress_is_silent_off_a_terminal_or_when_quiet(stream, quiet):
    with Progress(stream, quiet=quiet, delay=0.0) as progress:
        progress(0, 1, "case")
    assert stream.getvalue() == ""


def test_progress_waits_for_a_long_run():
    stream = _Terminal()
    with Progress(stream, delay=30.0) as progress:
        progress(0, 1, "case")
    assert stream.getvalue() == ""


def test_calibrate_honours_dir(tmp_path, capsys):
    """--dir picks the cases that folder's manifest lists (here one case generated into it)."""
    assert main(["golden", "generate", "--dir", str(tmp_path), "--select", "moe.route.v3/tiny/seed0"]) == 0
    capsys.readouterr()
    assert main(["golden", "calibrate", "--dir", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows and all("moe.route.v3/tiny/seed0" in row for row in rows), rows
    assert main(["golden", "calibrate", "--dir", str(tmp_path / "empty")]) == EXIT_GOLDEN


def test_quiet_is_accepted_by_the_long_commands(tmp_path):
    assert main(["check", "mla_ref.conformance.reference_adapter", "--quiet", "--select", "mla.core.paged/tiny/bs16"]) == 0
    assert main(["golden", "verify", "-q", "--select", "mla.core.paged/tiny/bs16"]) == 0


@pytest.mark.parametrize("raised, status, text", [(OSError(28, "No space left on device"), EXIT_USAGE, "mla-ref: error: [Errno 28] No space left on device"),
                                                  (KeyboardInterrupt(), EXIT_INTERRUPTED, "mla-ref: interrupted")])
def test_file_system_errors_and_ctrl_c_anywhere_are_one_line(monkeypatch, capsys, raised, status, text):
    def run(args):
        raise raised
    monkeypatch.setattr("mla_ref.cli._run", run)
    assert main(["info", "tiny"]) == status
    assert capsys.readouterr().err.splitlines() == [text]


def test_generate_and_verify_report_progress_before_each_case(tmp_path):
    """The progress hook of the long golden commands: called once per case, in order, with the total."""
    from mla_ref.golden.generate import generate, verify
    calls = []
    record = lambda done, total, case_id: calls.append((done, total, case_id))  # noqa: E731
    entries = generate(tmp_path, "mla.core.paged/tiny/", progress=record)
    assert calls == [(i, len(entries), case_id) for i, case_id in enumerate(entries)] and len(entries) == 2
    calls.clear()
    rows = verify(tmp_path, "mla.core.paged/tiny/", progress=record)
    assert [case_id for _, _, case_id in calls] == list(entries) and all(row.status == "ok" for row in rows)
