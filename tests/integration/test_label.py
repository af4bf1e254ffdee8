"""``posttrain label`` under a real pseudo-terminal: choices land at once, Ctrl-C loses none, resume works."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from components.data.jsonl import load_preference_file, write_jsonl
from tests.conftest import ROOT

PROMPT = b"better [1/2/s/q]> "


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


class Terminal:
    """``posttrain label`` as a child on a pty: its controlling terminal, so ^C is a real SIGINT."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI as a user would start it
            # A shell starts programs with SIGINT at its default; a test process may have inherited
            # or set SIG_IGN (which the exec would pass on, and Python then keeps ignoring ^C).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.environ["PYTHONPATH"] = str(ROOT)
            os.execv(sys.executable, [sys.executable, "-m", "flows.cli", "label", *args])
        self.pid, self.fd, self.seen = pid, fd, b""

    def read_until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {marker!r}; got:\n{self.seen.decode(errors='replace')}"
                )
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        out, _, self.seen = self.seen.partition(marker)
        return out + marker

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain, so the child never blocks writing to a full pty
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("posttrain label did not exit")


@pytest.mark.slow
def test_label_in_a_pty_survives_ctrl_c_and_resumes(tmp_path: Path) -> None:
    source = tmp_path / "pairs.jsonl"
    pairs = [_pair(f"add {i} and 1", str(i + 1), str(i + 2)) for i in range(4)]
    write_jsonl(source, [*pairs, pairs[0], _pair("same", "x", "x")])  # a duplicate and a tie are not asked
    labels = tmp_path / "labels" / "human.jsonl"
    args = ("--candidates", str(source), "--out", str(labels))

    term = Terminal(*args)
    assert b"0 pairs already decided" in term.read_until(PROMPT)
    term.send(b"1\r")
    term.read_until(PROMPT)
    assert len(labels.read_text().splitlines()) == 1, "the first choice is on disk before the next question"
    term.send(b"s\r")
    term.read_until(PROMPT)
    term.send(b"\x03")  # Ctrl-C at the third question
    assert term.wait() == 130
    assert b"every choice so far is saved" in term.seen
    assert len(labels.read_text().splitlines()) == 1
    assert len((tmp_path / "labels" / "human.jsonl.skipped").read_text().splitlines()) == 1

    term = Terminal(*args)
    assert b"2 pairs already decided" in term.read_until(PROMPT)
    term.send(b"2\r")
    term.read_until(PROMPT)
    term.send(b"1\r")
    assert term.wait() == 0
    assert b"2 labelled" in term.seen and b"0 left" in term.seen

    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(records) == 3 and len({r["id"] for r in records}) == 3
    assert all(r["source"] == "human" and r["chosen"] != r["rejected"] for r in records)
    asked = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in records}
    offered = {
        (p["prompt"][0]["content"], frozenset((p["chosen"][0]["content"], p["rejected"][0]["content"])))
        for p in pairs
    }
    assert asked < offered
    assert len(load_preference_file(labels)) == 3, "the labels file imports as it is (ingest.preference_data)"

    term = Terminal(*args)  # everything decided: nothing to ask
    assert term.wait() == 0
    assert b"4 pairs already decided" in term.seen and b"0 to go" in term.seen


def test_a_line_cut_off_mid_write_is_dropped_on_resume(tmp_path: Path) -> None:
    from flows.label import decided

    labels = tmp_path / "human.jsonl"
    labels.write_text('{"id": "a", "prompt": "p", "chosen": "1", "rejected": "2"}\n{"id": "b", "pro')
    assert decided(labels) == {"a"}
    assert labels.read_text().endswith('"rejected": "2"}\n')
