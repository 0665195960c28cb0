"""Performance: timers, calibration probes (measured ceilings), roofline arithmetic, telemetry
(NVML energy and memory), decode loops (framework and graph-captured) and the perf measurements.

Every speed number is meant to be read against what the device can do, measured on the spot
(harness.perf.probes), not only its datasheet (harness.hardware)."""
