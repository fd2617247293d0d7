"""Entry point of the sandbox's first process (argv: marker, control fd in, control fd out)."""

from __future__ import annotations

import marshal
import sys

from .namespaces import enter_namespaces
from .protocol import Frames, receive
from .supervisor import Supervisor


def main() -> None:
    ctl_in, ctl_out = int(sys.argv[2]), int(sys.argv[3])
    for name in [n for n in sys.modules if n == __package__ or n.startswith(f"{__package__}.")]:
        del sys.modules[name]  # the code's imports must not find the sandbox's own modules
    header, _ = receive(ctl_in, Frames(1 << 62))
    config = marshal.loads(header)
    sys.path.extend(config["site"])
    reason = config["no_namespaces"]
    if reason is None:
        reason = enter_namespaces(config, (ctl_in, ctl_out))
    Supervisor(config, ctl_in, ctl_out, reason).loop()
