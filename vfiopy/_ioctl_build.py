"""cffi builder (API mode) for the VFIO and iommufd UAPI.

Numbers and layouts come from the C compiler reading the installed headers: the
cdef below declares constants as ``...`` and structs as partial (``...;``), so
cffi asks the compiler for every value, offset and size.  UAPI newer than the
installed header is defined in ``_FALLBACKS`` under ``#ifndef`` guards, so a
newer header always wins over our copy.
"""

from __future__ import annotations

from cffi import FFI

# Definitions that a Linux 6.1 <linux/vfio.h> lacks (cdev, hot-reset devid
# flags, newer feature numbers) and the whole iommufd UAPI (<linux/iommufd.h>
# appeared in 6.2).  Layouts follow include/uapi/linux/{vfio,iommufd}.h.
FALLBACKS = r"""
#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/vfio.h>

#ifndef VFIO_DEVICE_BIND_IOMMUFD
struct vfio_device_bind_iommufd {
    __u32 argsz;
    __u32 flags;
    __s32 iommufd;
    __u32 out_devid;
};
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
struct vfio_device_attach_iommufd_pt {
    __u32 argsz;
    __u32 flags;
    __u32 pt_id;
};
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
struct vfio_device_detach_iommufd_pt {
    __u32 argsz;
    __u32 flags;
};
#define VFIO_DEVICE_DETACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 20)
#endif

#ifndef VFIO_DEVICE_BIND_FLAG_TOKEN
#define VFIO_DEVICE_BIND_FLAG_TOKEN (1 << 0)
#endif
/* VFIO_DEVICE_BIND_IOMMUFD with a VF token (86624ba3b522, Linux 6.17): the layout of
   struct vfio_device_bind_iommufd from then, under vfiopy's own name, so that an older
   header's shorter struct stays as it is. */
struct vfiopy_bind_iommufd_token {
    __u32 argsz;
    __u32 flags;
    __s32 iommufd;
    __u32 out_devid;
    __aligned_u64 token_uuid_ptr;
};

#ifndef VFIO_PCI_HOT_RESET_FLAG_DEV_ID
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID (1 << 0)
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED (1 << 1)
#endif
#ifndef VFIO_PCI_DEVID_OWNED
#define VFIO_PCI_DEVID_OWNED 0
#define VFIO_PCI_DEVID_NOT_OWNED -1
#endif
#ifndef VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP
#define VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP 5
#endif
#ifndef VFIO_MIGRATION_PRE_COPY
#define VFIO_MIGRATION_PRE_COPY (1 << 2)
#endif
#ifndef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE 9
#endif
#ifndef VFIO_DEVICE_FEATURE_BUS_MASTER
#define VFIO_DEVICE_FEATURE_BUS_MASTER 10
#endif

#if defined(__has_include)
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif
#endif
#ifndef IOMMUFD_TYPE
#define IOMMUFD_TYPE (';')
#define IOMMUFD_CMD_BASE 0x80
struct iommu_destroy {
    __u32 size;
    __u32 id;
};
#define IOMMU_DESTROY _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 0)
struct iommu_ioas_alloc {
    __u32 size;
    __u32 flags;
    __u32 out_ioas_id;
};
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 1)
struct iommu_iova_range {
    __aligned_u64 start;
    __aligned_u64 last;
};
struct iommu_ioas_allow_iovas {
    __u32 size;
    __u32 ioas_id;
    __u32 num_iovas;
    __u32 __reserved;
    __aligned_u64 allowed_iovas;
};
#define IOMMU_IOAS_ALLOW_IOVAS _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 2)
struct iommu_ioas_iova_ranges {
    __u32 size;
    __u32 ioas_id;
    __u32 num_iovas;
    __u32 __reserved;
    __aligned_u64 allowed_iovas;
    __aligned_u64 out_iova_alignment;
};
#define IOMMU_IOAS_IOVA_RANGES _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 4)
#define IOMMU_IOAS_MAP_FIXED_IOVA (1 << 0)
#define IOMMU_IOAS_MAP_WRITEABLE (1 << 1)
#define IOMMU_IOAS_MAP_READABLE (1 << 2)
struct iommu_ioas_map {
    __u32 size;
    __u32 flags;
    __u32 ioas_id;
    __u32 __reserved;
    __aligned_u64 user_va;
    __aligned_u64 length;
    __aligned_u64 iova;
};
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 5)
struct iommu_ioas_unmap {
    __u32 size;
    __u32 ioas_id;
    __aligned_u64 iova;
    __aligned_u64 length;
};
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 6)
#define IOMMU_OPTION_RLIMIT_MODE 0
#define IOMMU_OPTION_HUGE_PAGES 1
#define IOMMU_OPTION_OP_SET 0
#define IOMMU_OPTION_OP_GET 1
struct iommu_option {
    __u32 size;
    __u32 option_id;
    __u16 op;
    __u16 __reserved;
    __u32 object_id;
    __aligned_u64 val64;
};
#define IOMMU_OPTION _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 7)
#endif
"""

# Small C helpers: exact-width volatile MMIO accesses (one load or store of
# that width, never split or merged by the compiler) and syscalls returning
# -errno so the caller needs no thread-local errno.
HELPERS = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint8_t vfiopy_read8(uintptr_t a) { return *(volatile uint8_t *)a; }
static uint16_t vfiopy_read16(uintptr_t a) { return *(volatile uint16_t *)a; }
static uint32_t vfiopy_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static uint64_t vfiopy_read64(uintptr_t a) { return *(volatile uint64_t *)a; }
static void vfiopy_write8(uintptr_t a, uint8_t v) { *(volatile uint8_t *)a = v; }
static void vfiopy_write16(uintptr_t a, uint16_t v) { *(volatile uint16_t *)a = v; }
static void vfiopy_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static void vfiopy_write64(uintptr_t a, uint64_t v) { *(volatile uint64_t *)a = v; }

/* Bulk copies in 32-bit units: device memory must not see byte-wise or
 * wider-than-asked accesses that a plain memcpy may issue. */
static void vfiopy_copy_from_io32(void *dst, uintptr_t src, size_t n32) {
    uint32_t *d = (uint32_t *)dst;
    for (size_t i = 0; i < n32; i++)
        d[i] = ((volatile uint32_t *)src)[i];
}
static void vfiopy_copy_to_io32(uintptr_t dst, const void *src, size_t n32) {
    const uint32_t *s = (const uint32_t *)src;
    for (size_t i = 0; i < n32; i++)
        ((volatile uint32_t *)dst)[i] = s[i];
}

static int vfiopy_ioctl_ptr(int fd, unsigned long req, void *arg) {
    int r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}
static int vfiopy_ioctl_int(int fd, unsigned long req, unsigned long arg) {
    int r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}
static int vfiopy_mmap(int fd, size_t len, int prot, int flags, int64_t off,
                       uintptr_t *out) {
    void *p = mmap(NULL, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        return -errno;
    *out = (uintptr_t)p;
    return 0;
}
static int vfiopy_munmap(uintptr_t addr, size_t len) {
    return munmap((void *)addr, len) < 0 ? -errno : 0;
}
/* Replace [addr, addr+len) in one step with private zero pages: the old
 * mapping (and the file it held) is gone, yet a load or store racing with
 * this lands in harmless memory instead of faulting on a hole. */
static int vfiopy_remap_anonymous(uintptr_t addr, size_t len) {
    void *p = mmap((void *)addr, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? -errno : 0;
}
static int vfiopy_pidfd_open(int pid, unsigned int flags) {
    long r = syscall(434 /* __NR_pidfd_open */, pid, flags);
    return r < 0 ? -errno : (int)r;
}
static int vfiopy_pidfd_getfd(int pidfd, int targetfd, unsigned int flags) {
    long r = syscall(438 /* __NR_pidfd_getfd */, pidfd, targetfd, flags);
    return r < 0 ? -errno : (int)r;
}
static int vfiopy_pidfd_send_signal(int pidfd, int sig, unsigned int flags) {
    long r = syscall(424 /* __NR_pidfd_send_signal */, pidfd, sig, NULL, flags);
    return r < 0 ? -errno : 0;
}
/* kcmp's number differs between architectures (unlike the pidfd calls above),
 * so it comes from <sys/syscall.h>; a libc without it reports ENOSYS like a
 * kernel built without CONFIG_KCMP. */
static int vfiopy_kcmp(int pid1, int pid2, int type, unsigned long idx1,
                       unsigned long idx2) {
#ifdef SYS_kcmp
    long r = syscall(SYS_kcmp, pid1, pid2, type, idx1, idx2);
    return r < 0 ? -errno : (int)r;
#else
    return -ENOSYS;
#endif
}
"""

CDEF_VFIO = """
#define VFIO_API_VERSION ...
#define VFIO_TYPE1_IOMMU ...
#define VFIO_SPAPR_TCE_IOMMU ...
#define VFIO_TYPE1v2_IOMMU ...
#define VFIO_DMA_CC_IOMMU ...
#define VFIO_EEH ...
#define VFIO_TYPE1_NESTING_IOMMU ...
#define VFIO_SPAPR_TCE_v2_IOMMU ...
#define VFIO_NOIOMMU_IOMMU ...
#define VFIO_UNMAP_ALL ...
#define VFIO_UPDATE_VADDR ...

#define VFIO_GET_API_VERSION ...
#define VFIO_CHECK_EXTENSION ...
#define VFIO_SET_IOMMU ...
#define VFIO_GROUP_GET_STATUS ...
#define VFIO_GROUP_SET_CONTAINER ...
#define VFIO_GROUP_UNSET_CONTAINER ...
#define VFIO_GROUP_GET_DEVICE_FD ...
#define VFIO_DEVICE_GET_INFO ...
#define VFIO_DEVICE_GET_REGION_INFO ...
#define VFIO_DEVICE_GET_IRQ_INFO ...
#define VFIO_DEVICE_SET_IRQS ...
#define VFIO_DEVICE_RESET ...
#define VFIO_DEVICE_GET_PCI_HOT_RESET_INFO ...
#define VFIO_DEVICE_PCI_HOT_RESET ...
#define VFIO_DEVICE_IOEVENTFD ...
#define VFIO_DEVICE_FEATURE ...
#define VFIO_DEVICE_BIND_IOMMUFD ...
#define VFIO_DEVICE_BIND_FLAG_TOKEN ...
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT ...
#define VFIO_DEVICE_DETACH_IOMMUFD_PT ...
#define VFIO_IOMMU_GET_INFO ...
#define VFIO_IOMMU_MAP_DMA ...
#define VFIO_IOMMU_UNMAP_DMA ...
#define VFIO_IOMMU_ENABLE ...
#define VFIO_IOMMU_DISABLE ...
#define VFIO_IOMMU_DIRTY_PAGES ...

#define VFIO_GROUP_FLAGS_VIABLE ...
#define VFIO_GROUP_FLAGS_CONTAINER_SET ...

#define VFIO_DEVICE_FLAGS_RESET ...
#define VFIO_DEVICE_FLAGS_PCI ...
#define VFIO_DEVICE_FLAGS_PLATFORM ...
#define VFIO_DEVICE_FLAGS_AMBA ...
#define VFIO_DEVICE_FLAGS_CCW ...
#define VFIO_DEVICE_FLAGS_AP ...
#define VFIO_DEVICE_FLAGS_FSL_MC ...
#define VFIO_DEVICE_FLAGS_CAPS ...
#define VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP ...

#define VFIO_REGION_INFO_FLAG_READ ...
#define VFIO_REGION_INFO_FLAG_WRITE ...
#define VFIO_REGION_INFO_FLAG_MMAP ...
#define VFIO_REGION_INFO_FLAG_CAPS ...
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP ...
#define VFIO_REGION_INFO_CAP_TYPE ...
#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE ...
#define VFIO_REGION_TYPE_PCI_VENDOR_TYPE ...
#define VFIO_REGION_TYPE_PCI_VENDOR_MASK ...
#define VFIO_REGION_TYPE_GFX ...
#define VFIO_REGION_TYPE_CCW ...
#define VFIO_REGION_SUBTYPE_INTEL_IGD_OPREGION ...
#define VFIO_REGION_SUBTYPE_INTEL_IGD_HOST_CFG ...
#define VFIO_REGION_SUBTYPE_INTEL_IGD_LPC_CFG ...
#define VFIO_REGION_SUBTYPE_GFX_EDID ...

#define VFIO_IRQ_INFO_EVENTFD ...
#define VFIO_IRQ_INFO_MASKABLE ...
#define VFIO_IRQ_INFO_AUTOMASKED ...
#define VFIO_IRQ_INFO_NORESIZE ...
#define VFIO_IRQ_SET_DATA_NONE ...
#define VFIO_IRQ_SET_DATA_BOOL ...
#define VFIO_IRQ_SET_DATA_EVENTFD ...
#define VFIO_IRQ_SET_ACTION_MASK ...
#define VFIO_IRQ_SET_ACTION_UNMASK ...
#define VFIO_IRQ_SET_ACTION_TRIGGER ...
#define VFIO_IRQ_SET_DATA_TYPE_MASK ...
#define VFIO_IRQ_SET_ACTION_TYPE_MASK ...

#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID ...
#define VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED ...
#define VFIO_PCI_DEVID_OWNED ...
#define VFIO_PCI_DEVID_NOT_OWNED ...

#define VFIO_DEVICE_FEATURE_MASK ...
#define VFIO_DEVICE_FEATURE_GET ...
#define VFIO_DEVICE_FEATURE_SET ...
#define VFIO_DEVICE_FEATURE_PROBE ...
#define VFIO_DEVICE_FEATURE_PCI_VF_TOKEN ...
#define VFIO_DEVICE_FEATURE_MIGRATION ...
#define VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE ...
#define VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY ...
#define VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP ...
#define VFIO_DEVICE_FEATURE_LOW_POWER_EXIT ...
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_START ...
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP ...
#define VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT ...
#define VFIO_DEVICE_FEATURE_MIG_DATA_SIZE ...
#define VFIO_DEVICE_FEATURE_BUS_MASTER ...
#define VFIO_MIGRATION_STOP_COPY ...
#define VFIO_MIGRATION_P2P ...
#define VFIO_MIGRATION_PRE_COPY ...

#define VFIO_DEVICE_IOEVENTFD_8 ...
#define VFIO_DEVICE_IOEVENTFD_16 ...
#define VFIO_DEVICE_IOEVENTFD_32 ...
#define VFIO_DEVICE_IOEVENTFD_64 ...

#define VFIO_IOMMU_INFO_PGSIZES ...
#define VFIO_IOMMU_INFO_CAPS ...
#define VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE ...
#define VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION ...
#define VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL ...
#define VFIO_DMA_MAP_FLAG_READ ...
#define VFIO_DMA_MAP_FLAG_WRITE ...
#define VFIO_DMA_MAP_FLAG_VADDR ...
#define VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP ...
#define VFIO_DMA_UNMAP_FLAG_ALL ...
#define VFIO_DMA_UNMAP_FLAG_VADDR ...

#define VFIO_PCI_BAR0_REGION_INDEX ...
#define VFIO_PCI_BAR1_REGION_INDEX ...
#define VFIO_PCI_BAR2_REGION_INDEX ...
#define VFIO_PCI_BAR3_REGION_INDEX ...
#define VFIO_PCI_BAR4_REGION_INDEX ...
#define VFIO_PCI_BAR5_REGION_INDEX ...
#define VFIO_PCI_ROM_REGION_INDEX ...
#define VFIO_PCI_CONFIG_REGION_INDEX ...
#define VFIO_PCI_VGA_REGION_INDEX ...
#define VFIO_PCI_NUM_REGIONS ...
#define VFIO_PCI_INTX_IRQ_INDEX ...
#define VFIO_PCI_MSI_IRQ_INDEX ...
#define VFIO_PCI_MSIX_IRQ_INDEX ...
#define VFIO_PCI_ERR_IRQ_INDEX ...
#define VFIO_PCI_REQ_IRQ_INDEX ...
#define VFIO_PCI_NUM_IRQS ...

struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; ...; };
struct vfio_group_status { uint32_t argsz; uint32_t flags; ...; };
struct vfio_device_info {
    uint32_t argsz; uint32_t flags; uint32_t num_regions; uint32_t num_irqs;
    uint32_t cap_offset; ...;
};
struct vfio_region_info {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t cap_offset;
    uint64_t size; uint64_t offset; ...;
};
struct vfio_region_sparse_mmap_area { uint64_t offset; uint64_t size; ...; };
struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header; uint32_t nr_areas; uint32_t reserved;
    struct vfio_region_sparse_mmap_area areas[]; ...;
};
struct vfio_region_info_cap_type {
    struct vfio_info_cap_header header; uint32_t type; uint32_t subtype; ...;
};
struct vfio_irq_info {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t count; ...;
};
struct vfio_irq_set {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t start;
    uint32_t count; uint8_t data[]; ...;
};
struct vfio_pci_dependent_device {
    uint32_t group_id; uint16_t segment; uint8_t bus; uint8_t devfn; ...;
};
struct vfio_pci_hot_reset_info {
    uint32_t argsz; uint32_t flags; uint32_t count;
    struct vfio_pci_dependent_device devices[]; ...;
};
struct vfio_pci_hot_reset {
    uint32_t argsz; uint32_t flags; uint32_t count; int32_t group_fds[]; ...;
};
struct vfio_device_ioeventfd {
    uint32_t argsz; uint32_t flags; uint64_t offset; uint64_t data;
    int32_t fd; ...;
};
struct vfio_device_feature { uint32_t argsz; uint32_t flags; uint8_t data[]; ...; };
struct vfio_device_feature_migration { uint64_t flags; ...; };
struct vfio_device_feature_mig_state { uint32_t device_state; int32_t data_fd; ...; };
struct vfio_device_bind_iommufd {
    uint32_t argsz; uint32_t flags; int32_t iommufd; uint32_t out_devid; ...;
};
struct vfiopy_bind_iommufd_token {
    uint32_t argsz; uint32_t flags; int32_t iommufd; uint32_t out_devid;
    uint64_t token_uuid_ptr; ...;
};
struct vfio_device_attach_iommufd_pt {
    uint32_t argsz; uint32_t flags; uint32_t pt_id; ...;
};
struct vfio_device_detach_iommufd_pt { uint32_t argsz; uint32_t flags; ...; };
struct vfio_iommu_type1_info {
    uint32_t argsz; uint32_t flags; uint64_t iova_pgsizes; uint32_t cap_offset; ...;
};
struct vfio_iova_range { uint64_t start; uint64_t end; ...; };
struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header; uint32_t nr_iovas; uint32_t reserved;
    struct vfio_iova_range iova_ranges[]; ...;
};
struct vfio_iommu_type1_info_dma_avail {
    struct vfio_info_cap_header header; uint32_t avail; ...;
};
struct vfio_iommu_type1_dma_map {
    uint32_t argsz; uint32_t flags; uint64_t vaddr; uint64_t iova; uint64_t size; ...;
};
struct vfio_iommu_type1_dma_unmap {
    uint32_t argsz; uint32_t flags; uint64_t iova; uint64_t size; ...;
};
"""

CDEF_IOMMUFD = """
#define IOMMU_DESTROY ...
#define IOMMU_IOAS_ALLOC ...
#define IOMMU_IOAS_ALLOW_IOVAS ...
#define IOMMU_IOAS_IOVA_RANGES ...
#define IOMMU_IOAS_MAP ...
#define IOMMU_IOAS_UNMAP ...
#define IOMMU_OPTION ...
#define IOMMU_IOAS_MAP_FIXED_IOVA ...
#define IOMMU_IOAS_MAP_WRITEABLE ...
#define IOMMU_IOAS_MAP_READABLE ...
#define IOMMU_OPTION_RLIMIT_MODE ...
#define IOMMU_OPTION_HUGE_PAGES ...
#define IOMMU_OPTION_OP_SET ...
#define IOMMU_OPTION_OP_GET ...

struct iommu_destroy { uint32_t size; uint32_t id; ...; };
struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; ...; };
struct iommu_iova_range { uint64_t start; uint64_t last; ...; };
struct iommu_ioas_allow_iovas {
    uint32_t size; uint32_t ioas_id; uint32_t num_iovas; uint64_t allowed_iovas; ...;
};
struct iommu_ioas_iova_ranges {
    uint32_t size; uint32_t ioas_id; uint32_t num_iovas;
    uint64_t allowed_iovas; uint64_t out_iova_alignment; ...;
};
struct iommu_ioas_map {
    uint32_t size; uint32_t flags; uint32_t ioas_id;
    uint64_t user_va; uint64_t length; uint64_t iova; ...;
};
struct iommu_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; ...; };
struct iommu_option {
    uint32_t size; uint32_t option_id; uint16_t op; uint32_t object_id; uint64_t val64; ...;
};
"""

CDEF_HELPERS = """
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
#define MAP_PRIVATE ...
#define MAP_ANONYMOUS ...
uint8_t vfiopy_read8(uintptr_t a);
uint16_t vfiopy_read16(uintptr_t a);
uint32_t vfiopy_read32(uintptr_t a);
uint64_t vfiopy_read64(uintptr_t a);
void vfiopy_write8(uintptr_t a, uint8_t v);
void vfiopy_write16(uintptr_t a, uint16_t v);
void vfiopy_write32(uintptr_t a, uint32_t v);
void vfiopy_write64(uintptr_t a, uint64_t v);
void vfiopy_copy_from_io32(void *dst, uintptr_t src, size_t n32);
void vfiopy_copy_to_io32(uintptr_t dst, const void *src, size_t n32);
int vfiopy_ioctl_ptr(int fd, unsigned long req, void *arg);
int vfiopy_ioctl_int(int fd, unsigned long req, unsigned long arg);
int vfiopy_mmap(int fd, size_t len, int prot, int flags, int64_t off, uintptr_t *out);
int vfiopy_munmap(uintptr_t addr, size_t len);
int vfiopy_remap_anonymous(uintptr_t addr, size_t len);
int vfiopy_pidfd_open(int pid, unsigned int flags);
int vfiopy_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int vfiopy_pidfd_send_signal(int pidfd, int sig, unsigned int flags);
int vfiopy_kcmp(int pid1, int pid2, int type, unsigned long idx1, unsigned long idx2);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF_VFIO + CDEF_IOMMUFD + CDEF_HELPERS)
ffibuilder.set_source("vfiopy._uapi_cffi", FALLBACKS + HELPERS)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
