"""The gpu-monitor service: samples its node (host, CPU, memory, disks, network, NVML GPUs, OpenCL) and publishes a NodeRecord."""
