"""components.environment: offline defaults, and known-harmless log lines muted (only those)."""

from __future__ import annotations

import subprocess
import sys


def test_bitsandbytes_kernel_notice_is_muted_and_other_warnings_are_not() -> None:
    code = (
        "import components, logging\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: nope')\n"
        "log.warning('a real bitsandbytes warning')\n"
        "import bitsandbytes\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "a real bitsandbytes warning" in proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr, proc.stderr


def test_offline_defaults_never_override_the_user() -> None:
    code = "import os, components; print(os.environ['HF_HUB_OFFLINE'], os.environ['DVC_NO_ANALYTICS'])"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["0", "1"]
