"""What a reader of the control topic holds (`odpo_control_*`), exported by the gate and every gateway replica."""

from __future__ import annotations

from prometheus_client import Gauge

CONTROL_SEQ = Gauge("odpo_control_seq", "Sequence number of the gate's registry state this process holds "
                    "(the gate and every gateway replica that agree show the same number).")
CONTROL_EPOCH = Gauge("odpo_control_epoch", "Epoch of the newest gate this process has read on the control topic "
                      "(it rises with every start of the gate).")
