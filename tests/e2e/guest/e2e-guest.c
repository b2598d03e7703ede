// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// e2e-guest: the guest half of the vhost-device-iommu end-to-end test.
//
// Runs as a static binary from the initramfs (started by tests/e2e/guest/init once the modules
// are loaded and the endpoints are bound to vfio-pci) and drives the guest's virtio-iommu
// through VFIO: every VFIO_IOMMU_MAP_DMA / UNMAP_DMA becomes a virtio-iommu MAP / UNMAP request,
// and claiming / releasing a group (opening / closing a container) becomes an ATTACH.
//
// Everything the host needs is printed on the console as one line per event:
//
//     E2E <EVENT> key=value key=value ...
//
// A line carrying `wait=<seq>` stops the guest until the host writes `GO <seq>` on the same
// console (the guest reads its stdin, echo off). The wait is bounded by e2e.wait seconds; on
// timeout the guest reports a failure and carries on to its end.
//
// Parameters come from the kernel command line (all optional):
//   e2e.steps=viot,iommu,groups,bench,host,group   steps to run (default: those six; `hold`,
//                                             the life-cycle step, and `blk`, the block
//                                             device behind the IOMMU, run only when named)
//   e2e.ep=0000:00:05.0                       endpoint for bench and host steps
//   e2e.group_ep=0000:00:06.0                 a member of the multi-function group
//   e2e.n4k=20000 e2e.rounds32=1000 e2e.n2m=2000   VFIO loop iteration counts
//   e2e.wait=120                              seconds to wait for each GO
//   e2e.hold_loop_ms=2000                     length of the hold step's MAP/UNMAP loop
//   e2e.hold_extra=0                          pages the hold step also maps one by one
//   e2e.blk_bdf=0000:00:08.0 e2e.blk_ep=0x40  the blk step's virtio-blk device and its endpoint
//   e2e.blk_offset=4194304 e2e.blk_len=1048576  where it writes its pattern (O_DIRECT)
//   e2e.blk_bad_sector=-1                     a sector whose read must fail (the back-end's
//                                             test hook); -1: none
//
// Buffers shown to the host carry a pattern: the little-endian u64 at byte offset `o` of the
// buffer is `(seed << 32) | o`, with `seed` printed as pattern=0x... on the marker line.
#define _GNU_SOURCE
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>

#define PAGE 4096UL
#define SZ_2M (2UL << 20)

// IOVAs used by each step, far from the x86 MSI window (0xfee00000) and below 2^32.
#define IOVA_BENCH 0x10000000UL
#define IOVA_HOST 0x40000000UL
#define IOVA_GROUP_A 0x50000000UL
#define IOVA_GROUP_B 0x60000000UL
#define IOVA_HOLD 0x70000000UL
#define IOVA_HOLD_LOOP 0x71000000UL
#define IOVA_HOLD_NEXT 0x72000000UL
#define IOVA_HOLD_EXTRA 0x80000000UL

static char cmdline[4096];
static unsigned wait_secs = 120;
static unsigned seq;
static int failures;

// One marker line, written with a single write() so that it is never split by our own output.
__attribute__((format(printf, 1, 2))) static void marker(const char *fmt, ...)
{
	char line[8192];
	va_list ap;
	int n;

	n = snprintf(line, sizeof(line), "E2E ");
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (write(STDOUT_FILENO, line, n) < 0)
		_exit(3);
}

#define fail(...)                                                                                  \
	do {                                                                                       \
		failures++;                                                                        \
		marker("FAIL " __VA_ARGS__);                                                       \
	} while (0)

// The value of e2e.<name>= on the kernel command line (a fresh copy), or `def`.
static const char *param(const char *name, const char *def)
{
	char key[64];
	const char *p = cmdline;
	size_t klen;

	snprintf(key, sizeof(key), "e2e.%s=", name);
	klen = strlen(key);
	while ((p = strstr(p, key)) != NULL) {
		if (p == cmdline || p[-1] == ' ') {
			return strndup(p + klen, strcspn(p + klen, " \n"));
		}
		p += klen;
	}
	return def;
}

static unsigned long param_ul(const char *name, unsigned long def)
{
	const char *v = param(name, NULL);
	return v ? strtoul(v, NULL, 0) : def;
}

static int step_enabled(const char *steps, const char *step)
{
	size_t n = strlen(step);
	const char *p = steps;

	while ((p = strstr(p, step)) != NULL) {
		if ((p == steps || p[-1] == ',') && (p[n] == 0 || p[n] == ','))
			return 1;
		p += n;
	}
	return 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

// Block until the host writes "GO <n>" (other lines are ignored). Returns 0 on GO.
static int wait_go(unsigned n)
{
	char want[32], line[256];
	size_t len = 0;
	double deadline = now() + wait_secs;

	snprintf(want, sizeof(want), "GO %u", n);
	for (;;) {
		struct pollfd pfd = { .fd = STDIN_FILENO, .events = POLLIN };
		int left = (int)((deadline - now()) * 1000);
		char c;
		ssize_t r;

		if (left <= 0) {
			fail("step=wait seq=%u reason=timeout secs=%u", n, wait_secs);
			return -1;
		}
		if (poll(&pfd, 1, left) <= 0)
			continue;
		r = read(STDIN_FILENO, &c, 1);
		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			fail("step=wait seq=%u reason=stdin-closed", n);
			return -1;
		}
		if (c == '\r' || c == '\n') {
			line[len] = 0;
			len = 0;
			if (strcmp(line, want) == 0)
				return 0;
			continue;
		}
		if (len < sizeof(line) - 1)
			line[len++] = c;
	}
}

// A marker the host must acknowledge: prints it with wait=<seq> and blocks for GO <seq>.
#define marker_wait(fmt, ...)                                                                      \
	({                                                                                         \
		unsigned s_ = ++seq;                                                               \
		marker(fmt " wait=%u", ##__VA_ARGS__, s_);                                         \
		wait_go(s_);                                                                       \
	})

static void console_setup(void)
{
	struct termios t;

	if (tcgetattr(STDIN_FILENO, &t) == 0) {
		t.c_lflag &= ~(ECHO | ECHONL | ECHOE | ECHOK);
		t.c_lflag |= ICANON;
		t.c_oflag |= OPOST | ONLCR;
		tcsetattr(STDIN_FILENO, TCSANOW, &t);
	}
	tcflush(STDIN_FILENO, TCIFLUSH);
}

// ----------------------------------------------------------------------------------------------
// Kernel log
// ----------------------------------------------------------------------------------------------

static char *read_klog(void)
{
	int size = klogctl(10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0);
	char *buf;
	int n;

	if (size <= 0)
		size = 1 << 20;
	buf = malloc(size + 1);
	if (!buf)
		return NULL;
	n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, buf, size);
	if (n < 0) {
		free(buf);
		return NULL;
	}
	buf[n] = 0;
	return buf;
}

static int interesting(const char *line)
{
	if (strstr(line, "e2e."))
		return 0; // the command line
	static const char *const words[] = { "iommu", "IOMMU", "vfio", "VFIO", "VIOT",
					     "fault from", "Oops", "BUG", "WARNING", "I/O error",
					     "virtio_blk", NULL };
	for (int i = 0; words[i]; i++)
		if (strstr(line, words[i]))
			return 1;
	return 0;
}

// The driver probed: its "input address" and "page mask" lines are in the kernel log.
static void step_iommu(void)
{
	char *log = read_klog(), *line, *save = NULL;
	const char *input = NULL, *mask = NULL;

	if (!log) {
		fail("step=iommu reason=klogctl errno=%d", errno);
		return;
	}
	for (line = strtok_r(log, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		if (!strstr(line, "virtio_iommu"))
			continue;
		if (strstr(line, "input address: "))
			input = strstr(line, "input address: ") + strlen("input address: ");
		if (strstr(line, "page mask: "))
			mask = strstr(line, "page mask: ") + strlen("page mask: ");
	}
	if (input && mask)
		marker("IOMMU probed=1 input_bits=%lu page_mask=%s", strtoul(input, NULL, 10), mask);
	else
		fail("step=iommu reason=virtio_iommu-not-probed");
	free(log);
}

// The ACPI VIOT table the firmware handed over, in hex.
static void step_viot(void)
{
	unsigned char viot[4096];
	char hex[sizeof(viot) * 2 + 1];
	ssize_t n = -1;
	int fd;

	fd = open("/sys/firmware/acpi/tables/VIOT", O_RDONLY);
	if (fd >= 0) {
		n = read(fd, viot, sizeof(viot));
		close(fd);
	}
	if (n > 0) {
		for (ssize_t i = 0; i < n; i++)
			sprintf(hex + 2 * i, "%02x", viot[i]);
		marker("VIOT len=%zd hex=%s", n, hex);
	} else {
		marker("VIOT len=0");
	}
}

static void dump_dmesg(void)
{
	char *log = read_klog(), *line, *save = NULL;

	marker("DMESG_BEGIN");
	if (log) {
		for (line = strtok_r(log, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
			if (interesting(line))
				printf("%s\n", line);
		}
		fflush(stdout);
		free(log);
	}
	marker("DMESG_END");
}

// ----------------------------------------------------------------------------------------------
// Groups
// ----------------------------------------------------------------------------------------------

// IOMMU group number of a PCI device, or -1.
static int group_of(const char *bdf)
{
	char path[256], target[256];
	ssize_t n;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return -1;
	target[n] = 0;
	return atoi(strrchr(target, '/') + 1);
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

// Comma-separated, sorted members of IOMMU group `g`.
static void group_members(int g, char *out, size_t outlen)
{
	char path[64], *names[64];
	struct dirent *e;
	int n = 0;
	DIR *d;

	out[0] = 0;
	snprintf(path, sizeof(path), "/sys/kernel/iommu_groups/%d/devices", g);
	d = opendir(path);
	if (!d)
		return;
	while ((e = readdir(d)) != NULL && n < 64) {
		if (e->d_name[0] != '.')
			names[n++] = strdup(e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof(names[0]), cmp_str);
	for (int i = 0; i < n; i++) {
		if (i)
			strncat(out, ",", outlen - strlen(out) - 1);
		strncat(out, names[i], outlen - strlen(out) - 1);
		free(names[i]);
	}
}

// The bridge a PCI device sits behind (e.g. 0000:00:07.0 for a root port), or "root" for a
// device on a root bus: the parent directory of the device in sysfs.
static void parent_of(const char *bdf, char *out, size_t outlen)
{
	char path[256], target[512], *last, *prev;
	ssize_t n;

	snprintf(out, outlen, "unknown");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", bdf);
	n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return;
	target[n] = 0;
	last = strrchr(target, '/');
	if (!last)
		return;
	*last = 0;
	prev = strrchr(target, '/');
	prev = prev ? prev + 1 : target;
	snprintf(out, outlen, "%s", strncmp(prev, "pci", 3) == 0 ? "root" : prev);
}

static void step_groups(void)
{
	const char *list = param("vfio", "0000:00:05.0,0000:00:06.0,0000:00:06.1");
	char copy[512], *bdf, *save = NULL;
	int seen[64], nseen = 0;

	snprintf(copy, sizeof(copy), "%s", list);
	for (bdf = strtok_r(copy, ",", &save); bdf; bdf = strtok_r(NULL, ",", &save)) {
		char path[256], driver[256] = "none", parent[512];
		int g = group_of(bdf), dup = 0;
		ssize_t n;

		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", bdf);
		n = readlink(path, driver, sizeof(driver) - 1);
		if (n > 0) {
			driver[n] = 0;
			memmove(driver, strrchr(driver, '/') + 1, strlen(strrchr(driver, '/')));
		}
		parent_of(bdf, parent, sizeof(parent));
		marker("DEVICE bdf=%s group=%d driver=%s parent=%s", bdf, g, driver, parent);
		if (g < 0) {
			fail("step=groups bdf=%s reason=no-iommu-group", bdf);
			continue;
		}
		for (int i = 0; i < nseen; i++)
			dup |= seen[i] == g;
		if (dup || nseen == 64)
			continue;
		seen[nseen++] = g;

		char members[1024];
		group_members(g, members, sizeof(members));
		marker("GROUP group=%d devices=%s", g, members);
	}
}

// ----------------------------------------------------------------------------------------------
// VFIO
// ----------------------------------------------------------------------------------------------

struct vfio {
	int container;
	int group;
	int group_id;
};

static void vfio_close(struct vfio *v)
{
	if (v->group >= 0)
		close(v->group);
	if (v->container >= 0)
		close(v->container);
	v->group = v->container = -1;
}

// Claim the group of `bdf` for a fresh container: the guest driver ATTACHes every endpoint of
// the group to a new domain.
static int vfio_open(struct vfio *v, const char *bdf, const char *step)
{
	struct vfio_group_status status = { .argsz = sizeof(status) };
	char path[64];

	v->container = v->group = -1;
	v->group_id = group_of(bdf);
	if (v->group_id < 0) {
		fail("step=%s bdf=%s reason=no-iommu-group", step, bdf);
		return -1;
	}
	v->container = open("/dev/vfio/vfio", O_RDWR);
	if (v->container < 0) {
		fail("step=%s reason=open-container errno=%d", step, errno);
		return -1;
	}
	if (ioctl(v->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
	    ioctl(v->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0) {
		fail("step=%s reason=no-type1v2", step);
		goto err;
	}
	snprintf(path, sizeof(path), "/dev/vfio/%d", v->group_id);
	v->group = open(path, O_RDWR);
	if (v->group < 0) {
		fail("step=%s reason=open-group group=%d errno=%d", step, v->group_id, errno);
		goto err;
	}
	if (ioctl(v->group, VFIO_GROUP_GET_STATUS, &status) < 0 ||
	    !(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
		fail("step=%s reason=group-not-viable group=%d", step, v->group_id);
		goto err;
	}
	if (ioctl(v->group, VFIO_GROUP_SET_CONTAINER, &v->container) < 0) {
		fail("step=%s reason=set-container errno=%d", step, errno);
		goto err;
	}
	if (ioctl(v->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) {
		fail("step=%s reason=set-iommu errno=%d", step, errno);
		goto err;
	}
	return 0;
err:
	vfio_close(v);
	return -1;
}

static int dma_map(struct vfio *v, void *vaddr, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)vaddr,
		.iova = iova,
		.size = size,
	};
	return ioctl(v->container, VFIO_IOMMU_MAP_DMA, &map);
}

static int dma_unmap(struct vfio *v, uint64_t iova, uint64_t size)
{
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap),
		.iova = iova,
		.size = size,
	};
	if (ioctl(v->container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0)
		return -1;
	return unmap.size == size ? 0 : (errno = ERANGE, -1);
}

// The container's view of the IOMMU: page sizes and usable IOVA ranges.
static void vfio_info(struct vfio *v, const char *step)
{
	struct vfio_iommu_type1_info *info;
	uint32_t argsz = sizeof(*info);
	char ranges[1024] = "";

	info = calloc(1, argsz);
	info->argsz = argsz;
	if (ioctl(v->container, VFIO_IOMMU_GET_INFO, info) < 0)
		goto out;
	if (info->argsz > argsz) {
		argsz = info->argsz;
		info = realloc(info, argsz);
		memset(info, 0, argsz);
		info->argsz = argsz;
		if (ioctl(v->container, VFIO_IOMMU_GET_INFO, info) < 0)
			goto out;
	}
	if (info->flags & VFIO_IOMMU_INFO_CAPS) {
		uint32_t off = info->cap_offset;
		while (off && off + sizeof(struct vfio_info_cap_header) <= argsz) {
			struct vfio_info_cap_header *h = (void *)((char *)info + off);
			if (h->id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE) {
				struct vfio_iommu_type1_info_cap_iova_range *r = (void *)h;
				for (uint32_t i = 0; i < r->nr_iovas; i++) {
					char one[64];
					snprintf(one, sizeof(one), "%s0x%llx-0x%llx", i ? "," : "",
						 (unsigned long long)r->iova_ranges[i].start,
						 (unsigned long long)r->iova_ranges[i].end);
					strncat(ranges, one, sizeof(ranges) - strlen(ranges) - 1);
				}
			}
			off = h->next;
		}
	}
	marker("VFIO_INFO step=%s group=%d pgsizes=0x%llx iova_ranges=%s", step, v->group_id,
	       (unsigned long long)info->iova_pgsizes, ranges[0] ? ranges : "none");
out:
	free(info);
}

static void *alloc_buffer(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		       -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void fill_pattern(void *buf, size_t size, uint32_t seed)
{
	uint64_t *w = buf;
	for (size_t o = 0; o < size; o += 8)
		w[o / 8] = ((uint64_t)seed << 32) | o;
}

// Guest-physical address of the page holding `vaddr` (root reads PFNs from pagemap).
static uint64_t gpa_of(void *vaddr)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	if (fd < 0)
		return 0;
	if (pread(fd, &entry, sizeof(entry), ((uintptr_t)vaddr / PAGE) * 8) != sizeof(entry))
		entry = 0;
	close(fd);
	if (!(entry & (1ULL << 63)))
		return 0;
	return (entry & ((1ULL << 55) - 1)) * PAGE + ((uintptr_t)vaddr & (PAGE - 1));
}

// Comma-separated GPAs of every page of a buffer (the host checks each page).
static void gpa_list(void *buf, size_t size, char *out, size_t outlen)
{
	out[0] = 0;
	for (size_t o = 0; o < size; o += PAGE) {
		char one[32];
		snprintf(one, sizeof(one), "%s0x%llx", o ? "," : "",
			 (unsigned long long)gpa_of((char *)buf + o));
		strncat(out, one, outlen - strlen(out) - 1);
	}
}

// Latencies of single ioctls (sampled), in a log-linear histogram: 4 buckets per power of two
// of nanoseconds, up to 2^41 ns.
#define LAT_BUCKETS 164
struct lat {
	unsigned long n[2][LAT_BUCKETS]; // [map, unmap]
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void lat_add(struct lat *l, int unmap, uint64_t ns)
{
	unsigned i;
	if (ns < 4) {
		i = ns;
	} else {
		unsigned e = 63 - __builtin_clzll(ns);
		i = (e - 1) * 4 + ((ns >> (e - 2)) & 3);
		if (i >= LAT_BUCKETS)
			i = LAT_BUCKETS - 1;
	}
	l->n[unmap][i]++;
}

// The middle of the bucket holding quantile q of one kind, in nanoseconds (0: no samples).
static uint64_t lat_q(const struct lat *l, int unmap, double q)
{
	unsigned long total = 0, seen = 0, rank;
	for (unsigned i = 0; i < LAT_BUCKETS; i++)
		total += l->n[unmap][i];
	if (!total)
		return 0;
	rank = (unsigned long)(total * q + 0.999999);
	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < LAT_BUCKETS; i++) {
		seen += l->n[unmap][i];
		if (seen >= rank) {
			if (i < 4)
				return i;
			unsigned e = i / 4 + 1;
			uint64_t lo = (uint64_t)(4 + i % 4) << (e - 2);
			return lo + ((1ULL << (e - 2)) >> 1);
		}
	}
	return 0;
}

static void report(const char *name, unsigned long pairs, double secs, size_t size,
		   const struct lat *l)
{
	marker("BENCH name=%s size=%zu pairs=%lu secs=%.4f pairs_per_sec=%.0f "
	       "map_p50_ns=%llu map_p90_ns=%llu map_p99_ns=%llu map_max_ns=%llu "
	       "unmap_p50_ns=%llu unmap_p90_ns=%llu unmap_p99_ns=%llu unmap_max_ns=%llu",
	       name, size, pairs, secs, secs > 0 ? pairs / secs : 0.0,
	       (unsigned long long)lat_q(l, 0, 0.5), (unsigned long long)lat_q(l, 0, 0.9),
	       (unsigned long long)lat_q(l, 0, 0.99), (unsigned long long)lat_q(l, 0, 1.0),
	       (unsigned long long)lat_q(l, 1, 0.5), (unsigned long long)lat_q(l, 1, 0.9),
	       (unsigned long long)lat_q(l, 1, 0.99), (unsigned long long)lat_q(l, 1, 1.0));
}

// One map or unmap, timed when `timed` (the 4 KiB loops time one iteration in 4, so that the
// clock reads cost the loop little).
static int timed_map(struct vfio *v, struct lat *l, int timed, void *vaddr, uint64_t iova,
		     uint64_t size)
{
	uint64_t t = timed ? now_ns() : 0;
	int ret = dma_map(v, vaddr, iova, size);
	if (timed)
		lat_add(l, 0, now_ns() - t);
	return ret;
}

static int timed_unmap(struct vfio *v, struct lat *l, int timed, uint64_t iova, uint64_t size)
{
	uint64_t t = timed ? now_ns() : 0;
	int ret = dma_unmap(v, iova, size);
	if (timed)
		lat_add(l, 1, now_ns() - t);
	return ret;
}

static void step_bench(const char *ep)
{
	unsigned long n4k = param_ul("n4k", 20000), rounds = param_ul("rounds32", 1000),
		      n2m = param_ul("n2m", 2000);
	struct vfio v;
	char *buf4k, *buf32, *buf2m;
	static struct lat lat;
	double t;

	if (vfio_open(&v, ep, "bench") < 0)
		return;
	vfio_info(&v, "bench");
	buf4k = alloc_buffer(PAGE);
	buf32 = alloc_buffer(32 * PAGE);
	buf2m = alloc_buffer(SZ_2M);
	if (!buf4k || !buf32 || !buf2m) {
		fail("step=bench reason=alloc");
		goto out;
	}

	marker("BENCH_START name=map4k_x1");
	memset(&lat, 0, sizeof(lat));
	t = now();
	for (unsigned long i = 0; i < n4k; i++) {
		int timed = i % 4 == 0;
		if (timed_map(&v, &lat, timed, buf4k, IOVA_BENCH, PAGE) < 0 ||
		    timed_unmap(&v, &lat, timed, IOVA_BENCH, PAGE) < 0) {
			fail("step=bench name=map4k_x1 i=%lu errno=%d", i, errno);
			goto out;
		}
	}
	report("map4k_x1", n4k, now() - t, PAGE, &lat);

	marker("BENCH_START name=map4k_x32");
	memset(&lat, 0, sizeof(lat));
	t = now();
	for (unsigned long r = 0; r < rounds; r++) {
		int timed = r % 4 == 0;
		for (unsigned j = 0; j < 32; j++) {
			if (timed_map(&v, &lat, timed, buf32 + j * PAGE, IOVA_BENCH + j * PAGE,
				      PAGE) < 0) {
				fail("step=bench name=map4k_x32 round=%lu map=%u errno=%d", r, j, errno);
				goto out;
			}
		}
		for (unsigned j = 0; j < 32; j++) {
			if (timed_unmap(&v, &lat, timed, IOVA_BENCH + j * PAGE, PAGE) < 0) {
				fail("step=bench name=map4k_x32 round=%lu unmap=%u errno=%d", r, j, errno);
				goto out;
			}
		}
	}
	report("map4k_x32", rounds * 32, now() - t, PAGE, &lat);

	marker("BENCH_START name=map2m");
	memset(&lat, 0, sizeof(lat));
	t = now();
	for (unsigned long i = 0; i < n2m; i++) {
		if (timed_map(&v, &lat, 1, buf2m, IOVA_BENCH, SZ_2M) < 0 ||
		    timed_unmap(&v, &lat, 1, IOVA_BENCH, SZ_2M) < 0) {
			fail("step=bench name=map2m i=%lu errno=%d", i, errno);
			goto out;
		}
	}
	report("map2m", n2m, now() - t, SZ_2M, &lat);
out:
	vfio_close(&v);
}

// Map a patterned buffer for the host to check, then unmap it; the host checks at each stop.
static void step_host(const char *ep)
{
	const size_t len = 4 * PAGE;
	const uint32_t seed = 0x5eed0001;
	char gpas[512];
	struct vfio v;
	char *buf;

	if (vfio_open(&v, ep, "host") < 0)
		return;
	buf = alloc_buffer(len);
	if (!buf) {
		fail("step=host reason=alloc");
		goto out;
	}
	fill_pattern(buf, len, seed);
	if (dma_map(&v, buf, IOVA_HOST, len) < 0) {
		fail("step=host reason=map errno=%d", errno);
		goto out;
	}
	gpa_list(buf, len, gpas, sizeof(gpas));
	if (marker_wait("MAPPED bdf=%s group=%d iova=0x%lx len=%zu pattern=0x%x gpas=%s", ep,
			v.group_id, IOVA_HOST, len, seed, gpas) < 0)
		goto out;
	if (dma_unmap(&v, IOVA_HOST, len) < 0) {
		fail("step=host reason=unmap errno=%d", errno);
		goto out;
	}
	marker_wait("UNMAPPED bdf=%s group=%d iova=0x%lx len=%zu", ep, v.group_id, IOVA_HOST, len);
out:
	vfio_close(&v);
}

// Move a multi-function group between domains: claim (ATTACH to domain A), map; release
// (back to the default domain); claim again (ATTACH to a fresh domain B), map elsewhere.
static void step_group(const char *gep)
{
	const size_t len = PAGE;
	const uint32_t seed_a = 0x5eed00a0, seed_b = 0x5eed00b0;
	char members[1024], gpas[64];
	struct vfio v;
	char *buf_a, *buf_b;
	int g = group_of(gep);

	group_members(g, members, sizeof(members));
	buf_a = alloc_buffer(len);
	buf_b = alloc_buffer(len);
	if (!buf_a || !buf_b) {
		fail("step=group reason=alloc");
		return;
	}
	fill_pattern(buf_a, len, seed_a);
	fill_pattern(buf_b, len, seed_b);

	if (vfio_open(&v, gep, "group") < 0)
		return;
	if (dma_map(&v, buf_a, IOVA_GROUP_A, len) < 0) {
		fail("step=group reason=map-a errno=%d", errno);
		vfio_close(&v);
		return;
	}
	gpa_list(buf_a, len, gpas, sizeof(gpas));
	if (marker_wait("GROUP_ATTACHED group=%d devices=%s domain=a iova=0x%lx len=%zu pattern=0x%x "
			"gpas=%s",
			g, members, IOVA_GROUP_A, len, seed_a, gpas) < 0) {
		vfio_close(&v);
		return;
	}
	vfio_close(&v);
	if (marker_wait("GROUP_RELEASED group=%d devices=%s", g, members) < 0)
		return;

	if (vfio_open(&v, gep, "group") < 0)
		return;
	if (dma_map(&v, buf_b, IOVA_GROUP_B, len) < 0) {
		fail("step=group reason=map-b errno=%d", errno);
		vfio_close(&v);
		return;
	}
	gpa_list(buf_b, len, gpas, sizeof(gpas));
	if (marker_wait("GROUP_REATTACHED group=%d devices=%s domain=b iova=0x%lx len=%zu "
			"pattern=0x%x gpas=%s old_iova=0x%lx",
			g, members, IOVA_GROUP_B, len, seed_b, gpas, IOVA_GROUP_A) < 0) {
		vfio_close(&v);
		return;
	}
	if (dma_unmap(&v, IOVA_GROUP_B, len) < 0)
		fail("step=group reason=unmap-b errno=%d", errno);
	vfio_close(&v);
	marker_wait("GROUP_DONE group=%d devices=%s", g, members);
}

// One container of the hold step: its group, a buffer held mapped, and the loop's page.
struct held {
	struct vfio v;
	const char *bdf;
	char members[1024];
	size_t len;
	uint32_t seed;
	char *buf, *loop_buf, *next_buf;
	char gpas[512];
};

static int hold_open(struct held *h, const char *bdf, size_t len, uint32_t seed)
{
	memset(h, 0, sizeof(*h));
	h->bdf = bdf;
	h->len = len;
	h->seed = seed;
	h->v.container = h->v.group = -1;
	h->buf = alloc_buffer(len);
	h->loop_buf = alloc_buffer(PAGE);
	h->next_buf = alloc_buffer(PAGE);
	if (!h->buf || !h->loop_buf || !h->next_buf) {
		fail("step=hold bdf=%s reason=alloc", bdf);
		return -1;
	}
	fill_pattern(h->buf, len, seed);
	fill_pattern(h->next_buf, PAGE, seed + 1);
	if (vfio_open(&h->v, bdf, "hold") < 0)
		return -1;
	group_members(h->v.group_id, h->members, sizeof(h->members));
	if (dma_map(&h->v, h->buf, IOVA_HOLD, len) < 0) {
		fail("step=hold bdf=%s reason=map errno=%d", bdf, errno);
		return -1;
	}
	gpa_list(h->buf, len, h->gpas, sizeof(h->gpas));
	return 0;
}

// The life-cycle step: two containers (a single-function group and the two-function group)
// hold patterned buffers mapped while the host pauses, migrates, restarts or resets around
// them; then both run a MAP/UNMAP loop for e2e.hold_loop_ms, map one more buffer each, and
// unmap everything. Every MAP/UNMAP status is counted: the host expects errors=0.
static void step_hold(const char *ep, const char *gep)
{
	unsigned long loop_ms = param_ul("hold_loop_ms", 2000);
	unsigned long extra = param_ul("hold_extra", 0), mapped_extra = 0;
	char *extra_buf = NULL;
	unsigned long pairs = 0, errors = 0;
	int first_errno = 0;
	struct held h[2];
	char gpas[2][64];
	double t0;

	memset(h, 0, sizeof(h));
	for (int i = 0; i < 2; i++)
		h[i].v.container = h[i].v.group = -1;
	if (hold_open(&h[0], ep, 4 * PAGE, 0x5eed0c00) < 0 ||
	    hold_open(&h[1], gep, PAGE, 0x5eed0d00) < 0)
		goto out;
	// More state to carry: single pages, each its own MAP (and mapping), in the endpoint's
	// container.
	if (extra) {
		extra_buf = alloc_buffer(extra * PAGE);
		if (!extra_buf) {
			fail("step=hold reason=alloc-extra");
			goto out;
		}
		fill_pattern(extra_buf, extra * PAGE, 0x5eed0e00);
	}
	for (; mapped_extra < extra; mapped_extra++) {
		if (dma_map(&h[0].v, extra_buf + mapped_extra * PAGE,
			    IOVA_HOLD_EXTRA + 2 * mapped_extra * PAGE, PAGE) < 0) {
			fail("step=hold reason=map-extra i=%lu errno=%d", mapped_extra, errno);
			goto out;
		}
	}
	if (marker_wait("HELD extra=%lu extra_iova=0x%lx extra_pattern=0x%x ep=%s ep_group=%d ep_devices=%s ep_iova=0x%lx ep_len=%zu "
			"ep_pattern=0x%x ep_gpas=%s group=%d group_devices=%s group_iova=0x%lx "
			"group_len=%zu group_pattern=0x%x group_gpas=%s",
			extra, IOVA_HOLD_EXTRA, 0x5eed0e00, ep, h[0].v.group_id, h[0].members, IOVA_HOLD, h[0].len, h[0].seed, h[0].gpas,
			h[1].v.group_id, h[1].members, IOVA_HOLD, h[1].len, h[1].seed,
			h[1].gpas) < 0)
		goto out;

	// The loop: alternately in each container, one page at a time.
	t0 = now();
	while ((now() - t0) * 1000 < loop_ms) {
		for (int i = 0; i < 2; i++) {
			int r = dma_map(&h[i].v, h[i].loop_buf, IOVA_HOLD_LOOP, PAGE);
			if (r == 0)
				r = dma_unmap(&h[i].v, IOVA_HOLD_LOOP, PAGE);
			if (r < 0) {
				if (!errors++)
					first_errno = errno;
				// A failed UNMAP leaves the page mapped: try to clean up.
				dma_unmap(&h[i].v, IOVA_HOLD_LOOP, PAGE);
			} else {
				pairs++;
			}
		}
	}
	if (marker_wait("HOLD_LOOP pairs=%lu errors=%lu errno=%d secs=%.3f", pairs, errors,
			first_errno, now() - t0) < 0)
		goto out;

	// The next MAP in each container, beside the held buffers.
	for (int i = 0; i < 2; i++) {
		if (dma_map(&h[i].v, h[i].next_buf, IOVA_HOLD_NEXT, PAGE) < 0) {
			fail("step=hold bdf=%s reason=map-next errno=%d", h[i].bdf, errno);
			goto out;
		}
		gpa_list(h[i].next_buf, PAGE, gpas[i], sizeof(gpas[i]));
	}
	if (marker_wait("HOLD_NEXT ep=%s ep_iova=0x%lx ep_pattern=0x%x ep_gpas=%s group=%d "
			"group_iova=0x%lx group_pattern=0x%x group_gpas=%s len=%lu",
			ep, IOVA_HOLD_NEXT, h[0].seed + 1, gpas[0], h[1].v.group_id, IOVA_HOLD_NEXT,
			h[1].seed + 1, gpas[1], PAGE) < 0)
		goto out;
	for (int i = 0; i < 2; i++) {
		if (dma_unmap(&h[i].v, IOVA_HOLD_NEXT, PAGE) < 0)
			fail("step=hold bdf=%s reason=unmap-next errno=%d", h[i].bdf, errno);
		if (dma_unmap(&h[i].v, IOVA_HOLD, h[i].len) < 0)
			fail("step=hold bdf=%s reason=unmap errno=%d", h[i].bdf, errno);
	}
	for (unsigned long i = 0; i < mapped_extra; i++) {
		if (dma_unmap(&h[0].v, IOVA_HOLD_EXTRA + 2 * i * PAGE, PAGE) < 0) {
			fail("step=hold reason=unmap-extra i=%lu errno=%d", i, errno);
			break;
		}
	}
	mapped_extra = 0;
	marker("HOLD_DONE ep=%s group=%d", ep, h[1].v.group_id);
out:
	vfio_close(&h[0].v);
	vfio_close(&h[1].v);
}

// ----------------------------------------------------------------------------------------------
// A block device behind the virtio-iommu
// ----------------------------------------------------------------------------------------------

// The virtio device (virtioN) under a PCI function, and the block device under it (vda), once
// the driver probed (probing waits for the IOMMU, so it may come late).
static int blk_find(const char *bdf, char *virtio, size_t vlen, char *disk, size_t dlen)
{
	char path[1024];
	double deadline = now() + 20;

	for (;;) {
		DIR *d;
		struct dirent *e;

		virtio[0] = disk[0] = 0;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", bdf);
		d = opendir(path);
		while (d && (e = readdir(d)) != NULL) {
			if (strncmp(e->d_name, "virtio", 6) == 0)
				snprintf(virtio, vlen, "%s", e->d_name);
		}
		if (d)
			closedir(d);
		if (virtio[0]) {
			snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s/block", bdf, virtio);
			d = opendir(path);
			while (d && (e = readdir(d)) != NULL) {
				if (e->d_name[0] != '.')
					snprintf(disk, dlen, "%s", e->d_name);
			}
			if (d)
				closedir(d);
		}
		if (disk[0]) {
			snprintf(path, sizeof(path), "/dev/%s", disk);
			if (access(path, R_OK | W_OK) == 0)
				return 0;
		}
		if (now() > deadline)
			return -1;
		usleep(100 * 1000);
	}
}

// The first line of a sysfs file, newline stripped ("" if unreadable).
static void read_line(const char *path, char *out, size_t outlen)
{
	ssize_t n = -1;
	int fd = open(path, O_RDONLY);

	if (fd >= 0) {
		n = read(fd, out, outlen - 1);
		close(fd);
	}
	out[n > 0 ? n : 0] = 0;
	out[strcspn(out, "\n")] = 0;
}

// Whether the kernel log has a line with `what` (polls up to `secs`).
static int klog_has(const char *what, double secs)
{
	double deadline = now() + secs;

	for (;;) {
		char *log = read_klog();
		int found = log && strstr(log, what);

		free(log);
		if (found)
			return 1;
		if (now() > deadline)
			return 0;
		usleep(50 * 1000);
	}
}

// The stock virtio_blk driver on a vhost-user-blk device behind the virtio-iommu: it must have
// negotiated VIRTIO_F_ACCESS_PLATFORM (bit 33), so every ring and buffer it gives the device
// is an IOVA it mapped through the virtio-iommu. Writes a pattern with O_DIRECT, reads it back,
// stops for the host (which checks the backing file and the daemon's counters); then, with
// e2e.blk_bad_sector, reads the sector whose data the back-end's test hook sends to an IOVA
// the guest never mapped: the read must fail (EIO) and the driver log the fault.
static void step_blk(void)
{
	const char *bdf = param("blk_bdf", "0000:00:08.0");
	unsigned long offset = param_ul("blk_offset", 4UL << 20), len = param_ul("blk_len", 1UL << 20);
	long bad_sector = strtol(param("blk_bad_sector", "-1"), NULL, 0);
	const uint32_t seed = 0x5eedb1c0;
	char virtio[256], disk[256], path[1024], features[128], driver[512], devpath[300];
	char *buf = NULL;
	int fd = -1, group;
	ssize_t n;

	if (blk_find(bdf, virtio, sizeof(virtio), disk, sizeof(disk)) < 0) {
		fail("step=blk reason=no-disk bdf=%s virtio=%s", bdf, virtio);
		return;
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s/features", bdf, virtio);
	read_line(path, features, sizeof(features));
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s/driver", bdf, virtio);
	n = readlink(path, driver, sizeof(driver) - 1);
	driver[n > 0 ? n : 0] = 0;
	group = group_of(bdf);
	marker("BLK_DEVICE bdf=%s virtio=%s disk=%s driver=%s group=%d features=%s "
	       "access_platform=%d",
	       bdf, virtio, disk, strrchr(driver, '/') ? strrchr(driver, '/') + 1 : driver, group,
	       features, strlen(features) > 33 && features[33] == '1');
	if (!(strlen(features) > 33 && features[33] == '1'))
		fail("step=blk reason=no-access-platform features=%s", features);

	snprintf(devpath, sizeof(devpath), "/dev/%s", disk);
	fd = open(devpath, O_RDWR | O_DIRECT);
	buf = alloc_buffer(len);
	if (fd < 0 || !buf) {
		fail("step=blk reason=open errno=%d", errno);
		goto out;
	}
	fill_pattern(buf, len, seed);
	n = pwrite(fd, buf, len, offset);
	if (n != (ssize_t)len) {
		fail("step=blk reason=write n=%zd errno=%d", n, errno);
		goto out;
	}
	if (fdatasync(fd) < 0) {
		fail("step=blk reason=fdatasync errno=%d", errno);
		goto out;
	}
	memset(buf, 0, len);
	n = pread(fd, buf, len, offset);
	if (n != (ssize_t)len) {
		fail("step=blk reason=read n=%zd errno=%d", n, errno);
		goto out;
	}
	{
		uint64_t *w = (uint64_t *)buf;
		size_t bad = 0;

		for (size_t o = 0; o < len; o += 8)
			bad += w[o / 8] != (((uint64_t)seed << 32) | o);
		if (marker_wait("BLK_IO disk=%s offset=%lu len=%lu pattern=0x%x written=%lu read=%zd "
				"mismatched_words=%zu",
				disk, offset, len, seed, len, n, bad) < 0)
			goto out;
		if (bad)
			fail("step=blk reason=read-back mismatched_words=%zu", bad);
	}
	if (bad_sector >= 0) {
		char want[64];

		n = pread(fd, buf, PAGE, (off_t)bad_sector * 512);
		marker("BLK_MISDIRECTED sector=%ld rc=%zd errno=%d", bad_sector, n, n < 0 ? errno : 0);
		if (n >= 0 || errno != EIO)
			fail("step=blk reason=misdirected-read-not-refused rc=%zd errno=%d", n, errno);
		// The fault record travels on the event queue, apart from the request's completion.
		snprintf(want, sizeof(want), "fault from EP %d", (int)param_ul("blk_ep", 0x40));
		if (!klog_has(want, 10))
			fail("step=blk reason=no-fault-in-dmesg want='%s'", want);
		// The device carries on: the pattern reads back.
		memset(buf, 0, len);
		n = pread(fd, buf, len, offset);
		marker("BLK_AFTER rc=%zd match=%d", n,
		       n == (ssize_t)len && ((uint64_t *)buf)[1] == (((uint64_t)seed << 32) | 8));
	}
out:
	if (buf)
		munmap(buf, len);
	if (fd >= 0)
		close(fd);
}

int main(void)
{
	const char *steps, *ep, *gep;
	int fd = open("/proc/cmdline", O_RDONLY);

	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof(cmdline) - 1);
		cmdline[n > 0 ? n : 0] = 0;
		close(fd);
	}
	steps = param("steps", "viot,iommu,groups,bench,host,group");
	ep = param("ep", "0000:00:05.0");
	gep = param("group_ep", "0000:00:06.0");
	wait_secs = param_ul("wait", 120);
	console_setup();
	setvbuf(stdout, NULL, _IOLBF, 0);

	marker("START steps=%s ep=%s group_ep=%s", steps, ep, gep);
	if (step_enabled(steps, "viot"))
		step_viot();
	if (step_enabled(steps, "iommu"))
		step_iommu();
	if (step_enabled(steps, "groups"))
		step_groups();
	if (step_enabled(steps, "bench"))
		step_bench(ep);
	if (step_enabled(steps, "host"))
		step_host(ep);
	if (step_enabled(steps, "group"))
		step_group(gep);
	if (step_enabled(steps, "hold"))
		step_hold(ep, gep);
	if (step_enabled(steps, "blk"))
		step_blk();
	dump_dmesg();
	marker("DONE status=%s failures=%d", failures ? "fail" : "ok", failures);
	return failures ? 1 : 0;
}
