/* A fake libnvidia-ml.so.1 for the gpu-monitor tests: the NVML entry points pynvml
 * (nvidia-ml-py) calls, with deterministic answers, so that the real pynvml and the
 * real NvmlProbe run end to end on a machine without an NVIDIA GPU.
 *
 * Built by tests/_fakenvml.py; a test puts its directory on LD_LIBRARY_PATH of a
 * subprocess (pynvml does CDLL("libnvidia-ml.so.1")).  Behaviour, read at nvmlInit:
 *   FAKE_NVML_GPUS        number of GPUs (default 1)
 *   FAKE_NVML_INIT_ERROR  an NVML return code nvmlInit answers (9 = driver not loaded)
 *   FAKE_NVML_PIDS        comma list of pids reported as compute processes on GPU 0
 *   FAKE_NVML_LOST_AFTER  after this many sample rounds (calls of nvmlDeviceGetCount),
 *                         every query on GPU 0 answers NVML_ERROR_GPU_IS_LOST
 *   FAKE_NVML_NO_POWER=1  power usage and limits answer NVML_ERROR_NOT_SUPPORTED
 *   FAKE_NVML_BUS_IDS     comma list of PCI addresses "domain:bus:device.function" (hex), one
 *                         per GPU index; "-" makes that GPU's PCI info NVML_ERROR_NOT_SUPPORTED;
 *                         a GPU past the list sits at 0000:(A1 + index):00.0
 * Values: "Fake RTX 4090", 24 GiB, used 1 GiB + 256 MiB per pid, utilization 45 % / 30 %,
 * 60 C (+1 per index), 123.4 W of 450 W, SM 2520 MHz, memory 10501 MHz, compute 8.9.
 * Struct layouts follow nvml.h (and pynvml's ctypes mirrors of them).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
};

#define FAKE_MAX_GPUS 16
#define FAKE_MAX_PIDS 64
#define PCI_BUS_ID_BUFFER_SIZE 32
#define PCI_BUS_ID_BUFFER_V2_SIZE 16
#define GiB (1024ULL * 1024ULL * 1024ULL)
#define MiB (1024ULL * 1024ULL)

typedef struct fake_device {
    unsigned int index;
    int has_pci;                       /* 0: PCI info answers NVML_ERROR_NOT_SUPPORTED */
    unsigned int domain, bus, dev, function;
} *nvmlDevice_t;

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    char busIdLegacy[PCI_BUS_ID_BUFFER_V2_SIZE];   /* "%04X:%02X:%02X.0" */
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[PCI_BUS_ID_BUFFER_SIZE];            /* "%08X:%02X:%02X.0" */
} nvmlPciInfo_t;

/* nvml.h: NVML_STRUCT_VERSION(Memory, 2) */
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2 << 24U)))

static struct fake_device devices[FAKE_MAX_GPUS];
static int init_count;                 /* nvmlInit minus nvmlShutdown */
static unsigned int gpu_count = 1;
static unsigned int pids[FAKE_MAX_PIDS];
static unsigned int n_pids;
static long lost_after = -1;           /* -1: never */
static long rounds;                    /* calls of nvmlDeviceGetCount */
static int no_power;

static long env_long(const char *name, long dflt) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') return dflt;
    return strtol(v, NULL, 10);
}

static void read_env(void) {
    long n = env_long("FAKE_NVML_GPUS", 1);
    gpu_count = n < 0 ? 0 : (n > FAKE_MAX_GPUS ? FAKE_MAX_GPUS : (unsigned int)n);
    for (unsigned int i = 0; i < FAKE_MAX_GPUS; i++) {
        devices[i] = (struct fake_device){.index = i, .has_pci = 1, .bus = 0xA1 + i};
    }
    const char *b = getenv("FAKE_NVML_BUS_IDS");
    for (unsigned int i = 0; b != NULL && *b != '\0' && i < FAKE_MAX_GPUS; i++) {
        struct fake_device *d = &devices[i];
        if (*b == '-') {
            d->has_pci = 0;
        } else if (sscanf(b, "%x:%x:%x.%x", &d->domain, &d->bus, &d->dev, &d->function) != 4) {
            d->has_pci = 0;            /* a malformed entry: as if the driver could not say */
        }
        b = strchr(b, ',');
        b = b != NULL ? b + 1 : NULL;
    }
    lost_after = env_long("FAKE_NVML_LOST_AFTER", -1);
    no_power = env_long("FAKE_NVML_NO_POWER", 0) != 0;
    n_pids = 0;
    const char *p = getenv("FAKE_NVML_PIDS");
    while (p != NULL && *p != '\0' && n_pids < FAKE_MAX_PIDS) {
        char *end;
        unsigned long pid = strtoul(p, &end, 10);
        if (end == p) break;
        pids[n_pids++] = (unsigned int)pid;
        p = (*end == ',') ? end + 1 : end;
    }
}

/* every device query starts here: initialised, a known handle, and not lost */
static nvmlReturn_t check(nvmlDevice_t d) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (d == NULL || d < devices || d >= devices + gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->index == 0 && lost_after >= 0 && rounds > lost_after) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_string(char *buf, unsigned int len, const char *s) {
    if (buf == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

static unsigned long long used_bytes(unsigned int index) {
    return GiB + (index == 0 ? n_pids * 256ULL * MiB : 0);
}

/* -- lifecycle ------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    long err = env_long("FAKE_NVML_INIT_ERROR", 0);
    if (err != 0) return (nvmlReturn_t)err;
    if (init_count == 0) {
        read_env();
        rounds = 0;
    }
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* -- system ---------------------------------------------------------------- */

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    return put_string(version, length, "550.54.15");
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    return put_string(version, length, "12.550.54.15");
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (v == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *v = 12040;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

/* -- devices --------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    rounds++;
    *count = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (init_count <= 0) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || index >= gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    nvmlReturn_t r = check(d);
    return r != NVML_SUCCESS ? r : put_string(name, length, "Fake RTX 4090");
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    char buf[64];
    snprintf(buf, sizeof buf, "GPU-fa4e0000-0000-4000-8000-%012u", d->index);
    return put_string(uuid, length, buf);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (pci == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (!d->has_pci) return NVML_ERROR_NOT_SUPPORTED;
    memset(pci, 0, sizeof *pci);
    pci->domain = d->domain;
    pci->bus = d->bus;
    pci->device = d->dev;
    pci->pciDeviceId = 0x268410DEu;    /* device 0x2684 (AD102), vendor 0x10DE (NVIDIA) */
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X", d->domain & 0xFFFFu, d->bus, d->dev,
             d->function);
    snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.%X", d->domain, d->bus, d->dev, d->function);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }
nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (m == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = 24 * GiB;
    m->used = used_bytes(d->index);
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (m == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (m->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    m->total = 24 * GiB;
    m->reserved = 0;
    m->used = used_bytes(d->index);
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (u == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    u->gpu = 45;
    u->memory = 30;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (temp == NULL || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = 60 + d->index;
    return NVML_SUCCESS;
}

static nvmlReturn_t power(nvmlDevice_t d, unsigned int *mw, unsigned int value) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (no_power) return NVML_ERROR_NOT_SUPPORTED;
    if (mw == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *mw = value;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) { return power(d, mw, 123400); }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *mw) { return power(d, mw, 450000); }
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t d, unsigned int *mw) { return power(d, mw, 450000); }

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (mhz == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    switch (type) {
    case 0: *mhz = 2520; return NVML_SUCCESS;   /* graphics */
    case 1: *mhz = 2520; return NVML_SUCCESS;   /* SM */
    case 2: *mhz = 10501; return NVML_SUCCESS;  /* memory */
    case 3: *mhz = 1965; return NVML_SUCCESS;   /* video */
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t d, int *major, int *minor) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (major == NULL || minor == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *major = 8;
    *minor = 9;
    return NVML_SUCCESS;
}

/* nvml.h's two-call protocol: NULL infos (or too small a count) answers the count needed
 * with NVML_ERROR_INSUFFICIENT_SIZE; no process at all answers NVML_SUCCESS and 0 */
static nvmlReturn_t processes(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos, int compute) {
    nvmlReturn_t r = check(d);
    if (r != NVML_SUCCESS) return r;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = (compute && d->index == 0) ? n_pids : 0;
    if (n == 0) {
        *count = 0;
        return NVML_SUCCESS;
    }
    if (infos == NULL || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < n; i++) {
        infos[i].pid = pids[i];
        infos[i].usedGpuMemory = 256ULL * MiB;
        infos[i].gpuInstanceId = 0xFFFFFFFFu;   /* not a MIG instance */
        infos[i].computeInstanceId = 0xFFFFFFFFu;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 0);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 1);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    return processes(d, count, infos, 0);
}
