"""A1111's ``modules.devices``: device and dtype policy (imports torch), over modules/models/devices.py."""
from modules.models.devices import (  # noqa: F401 - re-exported for extensions
    DevicePolicy, cpu_policy, select_device_policy, torch_gc,
)
