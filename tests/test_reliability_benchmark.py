"""benchmarks/reliability.py's bad-request catalogues, run against the in-process server of
test_server_reliability (so that every gRPC and REST case of the benchmark is also a regression test), and its
judges, which must call a wrong answer mishandled."""
import importlib.util
import json
import types
from pathlib import Path

import grpc
import pytest

from tests.test_server_reliability import served  # noqa: F401  (the module-scoped server fixture)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability.py"
_spec = importlib.util.spec_from_file_location("reliability_benchmark", _PATH)
reliability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reliability)


@pytest.fixture(scope="module")
def catalogue(served):  # noqa: F811
    server = types.SimpleNamespace(port=served["port"], rest_port=served["rest_port"])
    setup = {"features": served["features"], "numeric": served["numeric"]}
    return reliability.grpc_category(server, setup) + reliability.rest_category(server, setup)


def test_every_bad_grpc_and_rest_request_gets_a_clear_answer(catalogue):
    table = reliability.summary(catalogue)
    assert table["grpc"]["tried"] >= 30 and table["rest"]["tried"] >= 10  # the minimum counts
    mishandled = [f"{o.category}: {o.case}: {o.detail}" for o in catalogue if not o.clear]
    assert mishandled == []


def test_the_rpc_judge_calls_wrong_answers_mishandled():
    class Refused(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    def refuse(code, details):
        def call():
            raise Refused(code, details)
        return call

    expect = reliability.Expect((grpc.StatusCode.INVALID_ARGUMENT,), r"'history'")
    judge = lambda call: reliability.judge_rpc("grpc", "case", call, expect).clear  # noqa: E731
    assert judge(refuse(grpc.StatusCode.INVALID_ARGUMENT, "inputs['history']: bad"))
    assert not judge(refuse(grpc.StatusCode.INTERNAL, "inputs['history']: bad"))  # the wrong code
    assert not judge(refuse(grpc.StatusCode.INVALID_ARGUMENT, "bad input"))  # names nothing
    assert not judge(lambda: object())  # OK where an error was expected

    def fails():
        raise ValueError("client-side")
    assert not judge(fails)


def test_the_cli_judge_wants_one_clear_line(tmp_path):
    argv = ["serve", "--model-dir", tmp_path, "--model-name", "m", "--port", 70000]
    assert reliability.judge_command("port", argv, r"--port.*70000").clear
    assert not reliability.judge_command("port", argv, r"--rest-port").clear  # exit 2, but not naming it


def test_the_report_counts_per_category(tmp_path):
    Outcome = reliability.Outcome
    outcomes = [Outcome("grpc", "a", True, "ok"), Outcome("grpc", "b|c", False, "OK (an error was expected)"),
                Outcome("cli", "d", True, "exit 2")]
    stats = {"seconds": 1.0, "load": {"answered": 10, "lost": 0, "seconds": 1.0, "threads": 2,
                                      "versions answered": [1], "answered by a corrupt version": 0,
                                      reliability.NOT_LOADABLE: [2]},
             "export-kill": {"kills": 1, "killed mid-export": 1, "killed while writing a version": 1,
                             "partial versions": 0, "versions left": 0},
             "train-kill": {"trials": 1, "resumed from a saved epoch": 1}}
    reliability.write_report(tmp_path / "r", outcomes, stats, "benchmarks/reliability.py")
    text = (tmp_path / "r.md").read_text()
    assert f"| {reliability.CATEGORIES['grpc']} | 2 | 1 | 1 |" in text
    assert "| **all** | 3 | 2 | 1 |" in text and "| b\\|c | **no** |" in text
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["cli"] == {"tried": 1, "clear": 1,
                                                                             "mishandled": 0}
