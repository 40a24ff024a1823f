/*
 * kvmc-agent: the guest side of "kvmc-agent protocol 3" (see docs/agent-protocol.md).
 *
 * It runs as PID 1 of the microVM (exec'd by the initramfs /init), talks to the host over
 * a named virtio-serial port, sets the container up (mounts, eth0/eth1.., resolv.conf, read-only
 * root) before its main process, starts container processes chroot'ed into the container
 * rootfs, relays their stdio, reaps every zombie, and powers the VM off when the main
 * process (id 1) is over. For tests it can instead connect to a unix socket (--port).
 *
 * Single-threaded, one poll() loop. Built static against libc only; that is why the
 * passwd/group lookup is a hand parser (getpwnam in a static binary wants NSS modules).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/openat2.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD (1u << 20)
#define OUT_CHUNK (32 * 1024)
#define MAX_PROCS 16
#define DRAIN_MS 200         /* wait for pipes held open by grandchildren after a death */
#define ACK_MS 5000          /* wait for EXIT_ACK of the main process before ending */
#define HUP_BACKOFF_MS 20    /* device mode: pause on the port while no host is attached */
#define STDIN_HIGH (4u << 20) /* stop reading the port while this much stdin is queued */
#define MAX_GROUPS 64
#define PROTOCOL 3           /* the number in READY, --version and the RUN item proto */
#define OUT_LIMIT (1u << 20)  /* output queued for the host: above it, pipes wait (host there) or output is dropped (no host) */
#define RUN_TTY 0x01         /* RUN header flag: give the process a pseudo-terminal */

enum { T_RUN = 0x01, T_STDIN, T_SIGNAL, T_SHUTDOWN, T_EXIT_ACK, T_RESIZE, T_REATTACH,
       T_READY = 0x10, T_STARTED, T_STDOUT, T_STDERR, T_EXIT, T_ERROR, T_TABLE };

/* One frame on its way to the host. Frames are queued and written without blocking, so the
 * agent keeps serving its processes while no host reads the port (a monitor that died): see
 * "Re-attaching" in docs/agent-protocol.md. */
struct frame {
	struct frame *next;
	size_t size, off;            /* header + payload; bytes already written */
	unsigned char data[];
};

struct proc {
	int used;
	uint16_t id;
	pid_t pid;
	int exec_fd, out_fd, err_fd, in_fd; /* -1 once closed */
	int tty_fd;                         /* a TTY process: its pty master (resize, VEOF), else -1 */
	char *in_buf;                       /* stdin bytes not yet accepted by the pipe */
	size_t in_len;
	int in_eof;                         /* close the pipe once in_buf is empty */
	int exited, status;
	int64_t died_ms, fork_ms;
};

/* What a child reports through its CLOEXEC pipe when it could not exec. */
struct exec_report {
	int code;
	char msg[500];
};

static struct proc procs[MAX_PROCS];
static const char *root = "/";
static int port_fd = -1, socket_mode, no_poweroff, is_pid1;
/* --exit-by-reboot: end the VM with reboot(RB_AUTOBOOT), which the domain turns into destroy
 * (on_reboot=destroy). Without ACPI a guest cannot power the machine off, only halt it. */
static int exit_by_reboot;
static int boot_debug; /* kvmc.debug on the kernel command line: boot timestamps on the console */
static int sig_pipe[2] = { -1, -1 };
static int64_t port_pause_until;             /* device mode HUP backoff */
static int main_started, main_exit_sent, main_acked;
static int64_t end_deadline = -1, shutdown_deadline = -1;
static int shutdown_requested, shutdown_killed;
static int main_stop_signal = SIGTERM; /* RUN item stop_signal of process 1: what SHUTDOWN sends it */
static size_t stdin_queued;
static pid_t pgids[64]; /* every process group we started: orphans outlive their slot */
static unsigned npgids;
static unsigned char rbuf[8 + MAX_PAYLOAD];
static size_t rlen;
static struct frame *outq_head, *outq_tail;
static size_t outq_bytes;                  /* bytes queued for the host, not yet written */
static int host_gone;                      /* device mode: the port said no host is connected */
static uint64_t dropped_main, dropped_other; /* output bytes dropped while no host was there */
static struct frame *main_exit_frame;      /* process 1's EXIT while it is still queued */
static int main_exit_written;              /* ... and once it has left the queue */
static unsigned char main_exit_payload[5];
static pid_t main_pid;

static void logmsg(const char *fmt, ...)
{
	va_list ap;
	fputs("kvmc-agent: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* CLOCK_BOOTTIME: counts from kernel start, including suspend; clock_settime can't move it. */
static int64_t uptime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put_be32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get_be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static _Noreturn void finish(void);

static void end_timer_after_exit(void);

/* Write queued frames until the port would block. Frames never interleave: the queue is the
 * only writer and keeps their order. Nothing is written after the host left until the next one
 * speaks first: a monitor that re-attaches must get its TABLE ahead of the queued frames. */
static void flush_out(void)
{
	while (outq_head && !host_gone) {
		struct frame *f = outq_head;
		ssize_t n = write(port_fd, f->data + f->off, f->size - f->off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			logmsg("write to host: %s", strerror(errno));
			if (socket_mode)
				finish(); /* the host is gone: nobody can ever collect output */
			return;
		}
		f->off += n;
		outq_bytes -= n;
		if (f->off < f->size)
			continue;
		outq_head = f->next;
		if (!outq_head)
			outq_tail = NULL;
		if (f == main_exit_frame) {
			main_exit_frame = NULL;
			main_exit_written = 1;
			end_timer_after_exit();
		}
		free(f);
	}
}

static struct frame *new_frame(int type, uint16_t id, const void *payload, size_t len)
{
	struct frame *f = malloc(sizeof *f + 8 + len);
	if (!f) {
		logmsg("out of memory for a frame of %zu bytes (dropped)", len);
		return NULL;
	}
	unsigned char *h = f->data;
	h[0] = type; h[1] = 0; h[2] = id >> 8; h[3] = id & 0xff;
	put_be32(h + 4, len);
	memcpy(h + 8, payload, len);
	f->next = NULL;
	f->size = 8 + len;
	f->off = 0;
	return f;
}

static struct frame *enqueue(int type, uint16_t id, const void *payload, size_t len)
{
	struct frame *f = new_frame(type, id, payload, len);
	if (!f)
		return NULL;
	if (outq_tail)
		outq_tail->next = f;
	else
		outq_head = f;
	outq_tail = f;
	outq_bytes += f->size;
	return f;
}

/* Queue one whole frame for the host and write what the port takes now. */
static void send_frame(int type, uint16_t id, const void *payload, size_t len)
{
	enqueue(type, id, payload, len);
	flush_out();
}

/* Process output: queued like any frame, except while no host is connected and the queue is
 * full: then it is dropped (and counted, for the next host's TABLE), so that the processes
 * never stall on a host that is not there. */
static void send_output(int type, uint16_t id, const void *payload, size_t len)
{
	if (host_gone && outq_bytes >= OUT_LIMIT) {
		if (id == 1)
			dropped_main += len;
		else
			dropped_other += len;
		return;
	}
	send_frame(type, id, payload, len);
}

static void send_text(int type, uint16_t id, const char *fmt, ...)
{
	char buf[600];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	send_frame(type, id, buf, n < 0 ? 0 : (size_t)n >= sizeof buf ? sizeof buf - 1 : (size_t)n);
}

/* Process 1's EXIT reached the port: the VM ends at its EXIT_ACK or ACK_MS later. Not while
 * no host is there: the exit code waits for a host that re-attaches (TABLE) and acknowledges. */
static void end_timer_after_exit(void)
{
	if (main_exit_written && !main_acked && !host_gone)
		end_deadline = uptime_ms() + ACK_MS;
}

static void send_exit(uint16_t id, int kind, uint32_t value)
{
	unsigned char p[5] = { kind };
	put_be32(p + 1, value);
	struct frame *f = enqueue(T_EXIT, id, p, 5);
	if (id == 1) {
		memcpy(main_exit_payload, p, 5);
		main_exit_sent = 1;
		main_exit_frame = f; /* flush_out starts the end timer once it is written */
		if (!f) {
			main_exit_written = 1;
			end_timer_after_exit();
		}
	}
	flush_out();
}

static struct proc *find_proc(uint16_t id)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used && procs[i].id == id)
			return &procs[i];
	return NULL;
}

static void kill_proc(struct proc *p, int sig)
{
	if (p->pid > 0 && !p->exited) {
		kill(-p->pid, sig); /* its session/process group: reaches its children too */
		kill(p->pid, sig);  /* in case it left its group */
	}
}

/* Kill everything we started, including orphaned grandchildren (still in their groups). */
static void kill_all(int sig)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (procs[i].used)
			kill_proc(&procs[i], sig);
	for (unsigned i = 0; i < npgids && i < 64; i++)
		kill(-pgids[i], sig);
	if (is_pid1)
		kill(-1, sig); /* as PID 1 this hits every process but us */
}

static void reap(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (p->used && p->pid == pid && !p->exited) {
				p->exited = 1;
				p->status = st;
				p->died_ms = uptime_ms();
			}
		}
		/* Anything else is an orphan we inherited as PID 1 / subreaper: just reaped. */
	}
}

/* After SIGKILL to everything: collect the dead (up to 1 s) so none outlives us. */
static void reap_all(void)
{
	for (int i = 0; i < 100 && waitpid(-1, NULL, WNOHANG) >= 0; i++)
		usleep(10000);
}

/* The end of the VM (or of the test agent): kill what is left, flush, power off. */
/* Unmount everything under the container root, newest first (/proc/mounts lists mounts in
 * the order they were made), then the root: volumes, tmpfs, shares, what the container
 * mounted itself. A volume still mounted at power-off is an ext4 whose journal needs
 * recovery, and such a file system cannot be mounted read-only (-v NAME:/path:ro) later. */
static void unmount_container(void)
{
	enum { MAX_MOUNTS = 256 };
	char *points[MAX_MOUNTS], line[4096];
	size_t rootlen = strlen(root);
	int n = 0;
	FILE *f = fopen("/proc/mounts", "re");
	while (f && n < MAX_MOUNTS && fgets(line, sizeof line, f)) {
		char *point = strchr(line, ' '), *end;
		if (!point || !(end = strchr(++point, ' ')))
			continue;
		*end = 0;
		if (!strncmp(point, root, rootlen) && (point[rootlen] == '/' || !point[rootlen]))
			points[n++] = strdup(point);
	}
	if (f)
		fclose(f);
	while (n-- > 0) {
		if (points[n] && umount2(points[n], 0) < 0 && errno != EINVAL && errno != ENOENT)
			umount2(points[n], MNT_DETACH);
		free(points[n]);
	}
}


static _Noreturn void finish(void)
{
	/* What is still queued (an exec's last output and EXIT) goes out if a host takes it soon. */
	for (int i = 0; i < 20 && outq_head && !host_gone; i++) {
		struct pollfd pf = { port_fd, POLLOUT, 0 };
		if (poll(&pf, 1, 50) > 0 && pf.revents & POLLHUP)
			break;
		flush_out();
	}
	kill_all(SIGKILL);
	reap_all();
	if (is_pid1 && !no_poweroff) {
		sync();
		unmount_container();
		sync();
		reboot(exit_by_reboot ? RB_AUTOBOOT : RB_POWER_OFF);
		logmsg("reboot(%s): %s", exit_by_reboot ? "RB_AUTOBOOT" : "RB_POWER_OFF", strerror(errno));
		for (;;) /* PID 1 must never exit: that panics the kernel */
			pause();
	}
	exit(0);
}

/* ---------- child side of RUN (runs after fork, single-threaded, so stdio is fine) ---------- */

/* strerror as Go words it ("permission denied", "is a directory"): docker's clients classify
 * a failed start by these words (126 vs 127), and the Go runtime's messages are lower case. */
static const char *go_strerror(int err)
{
	static char text[128];
	snprintf(text, sizeof text, "%s", strerror(err));
	text[0] = (char)tolower((unsigned char)text[0]);
	return text;
}

static _Noreturn void child_fail(int fd, int code, const char *fmt, ...)
{
	struct exec_report r = { .code = code };
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r.msg, sizeof r.msg, fmt, ap);
	va_end(ap);
	if (write(fd, &r, sizeof r) < 0) { /* nothing more we can do */ }
	_exit(code);
}

static int all_digits(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

/* Split a colon-separated line in place; returns the number of fields. */
static int split_line(char *line, char **f, int max)
{
	int n = 0;
	line[strcspn(line, "\n")] = 0;
	f[n++] = line;
	for (char *c = line; *c && n < max; c++)
		if (*c == ':') {
			*c = 0;
			f[n++] = c + 1;
		}
	return n;
}

struct user_info {
	uid_t uid;
	gid_t gid;
	char name[256], home[1024];
	int found; /* a passwd entry matched */
};

/* Look the user up in /etc/passwd (already chroot'ed) by name or by uid. */
static int lookup_passwd(const char *name, long uid, struct user_info *u)
{
	FILE *f = fopen("/etc/passwd", "re");
	char line[4096], *fl[7];
	if (!f)
		return 0;
	while (fgets(line, sizeof line, f)) {
		if (split_line(line, fl, 7) < 7)
			continue;
		if (name ? strcmp(fl[0], name) == 0 : atol(fl[2]) == uid && all_digits(fl[2])) {
			u->uid = strtoul(fl[2], NULL, 10);
			u->gid = strtoul(fl[3], NULL, 10);
			snprintf(u->name, sizeof u->name, "%s", fl[0]);
			snprintf(u->home, sizeof u->home, "%s", fl[5]);
			u->found = 1;
			fclose(f);
			return 1;
		}
	}
	fclose(f);
	return 0;
}

/*
 * Resolve docker's `user` forms (name, uid, uid:gid, name:group, ...) and the supplementary
 * groups: every /etc/group entry listing the user by name (only if passwd knows the user).
 */
static void resolve_user(int efd, const char *spec, struct user_info *u, gid_t *groups, int *ngroups)
{
	char ubuf[256], *gpart;
	snprintf(ubuf, sizeof ubuf, "%s", spec && *spec ? spec : "0");
	if ((gpart = strchr(ubuf, ':')))
		*gpart++ = 0;
	memset(u, 0, sizeof *u);
	strcpy(u->home, "/");
	if (all_digits(ubuf)) {
		if (!lookup_passwd(NULL, atol(ubuf), u))
			u->uid = strtoul(ubuf, NULL, 10); /* unknown numeric uid: allowed, gid 0 */
	} else if (!lookup_passwd(ubuf, 0, u)) {
		child_fail(efd, 126, "unable to find user %s: no matching entries in passwd file", ubuf);
	}
	FILE *f = fopen("/etc/group", "re");
	char line[8192], *fl[4];
	int gfound = gpart ? all_digits(gpart) : 1;
	if (gpart && gfound)
		u->gid = strtoul(gpart, NULL, 10);
	groups[0] = u->gid;
	*ngroups = 1;
	while (f && fgets(line, sizeof line, f)) {
		if (split_line(line, fl, 4) < 4)
			continue;
		if (gpart && !gfound && strcmp(fl[0], gpart) == 0) {
			u->gid = groups[0] = strtoul(fl[2], NULL, 10);
			gfound = 1;
		}
		if (!u->found || *ngroups >= MAX_GROUPS)
			continue;
		for (char *m = strtok(fl[3], ","); m; m = strtok(NULL, ","))
			if (strcmp(m, u->name) == 0)
				groups[(*ngroups)++] = strtoul(fl[2], NULL, 10);
	}
	if (f)
		fclose(f);
	if (!gfound)
		child_fail(efd, 126, "unable to find group %s: no matching entries in group file", gpart);
}

static void mkdir_p(const char *path)
{
	char buf[4096];
	snprintf(buf, sizeof buf, "%s", path);
	for (char *s = buf + 1; *s; s++)
		if (*s == '/') {
			*s = 0;
			mkdir(buf, 0755);
			*s = '/';
		}
	mkdir(buf, 0755);
}

static const char *env_get(char **env, const char *name)
{
	size_t n = strlen(name);
	for (; *env; env++)
		if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
			return *env + n + 1;
	return NULL;
}

/* execve with PATH search in the *container's* PATH (execvpe would use ours). */
static _Noreturn void exec_in_path(int efd, char **argv, char **env)
{
	const char *cmd = argv[0];
	if (strchr(cmd, '/')) {
		execve(cmd, argv, env);
		if (errno == ENOENT)
			child_fail(efd, 127, "exec: \"%s\": stat %s: no such file or directory", cmd, cmd);
		child_fail(efd, 126, "exec: \"%s\": %s", cmd, go_strerror(errno));
	}
	const char *path = env_get(env, "PATH");
	int denied = 0;
	char full[4096];
	for (const char *d = path ? path : ""; path; d++) {
		size_t len = strcspn(d, ":");
		snprintf(full, sizeof full, "%.*s/%s", (int)len, len ? d : ".", cmd);
		execve(full, argv, env);
		if (errno == EACCES)
			denied = 1;
		else if (errno != ENOENT && errno != ENOTDIR && errno != ELOOP && errno != ENAMETOOLONG)
			child_fail(efd, 126, "exec: \"%s\": %s", cmd, go_strerror(errno));
		d += len;
		if (!*d)
			break;
	}
	if (denied)
		child_fail(efd, 126, "exec: \"%s\": permission denied", cmd);
	child_fail(efd, 127, "exec: \"%s\": executable file not found in $PATH", cmd);
}

struct run_spec {
	char **argv, **env; /* env has room for 4 more entries */
	int nenv;
	const char *cwd, *user, *hostname;
	char **ulimits, **cap_drops; /* any process: applied in the child before the exec */
	int nulimits, ncap_drops;
	char **mounts, **dns, **netifs; /* container setup, process 1 only */
	int nmounts, ndns, nnetifs, readonly_root;
	char **hosts, **dns_search, **dns_options; /* container setup too */
	int nhosts, ndns_search, ndns_options;
	const char *net;
	int tty; /* stdin, stdout and stderr are the pty's slave, which becomes the controlling terminal */
};

/* docker's --ulimit names (go-units), as RLIMIT_* */
static const struct { const char *name; int resource; } rlimit_names[] = {
	{ "core", RLIMIT_CORE }, { "cpu", RLIMIT_CPU }, { "data", RLIMIT_DATA }, { "fsize", RLIMIT_FSIZE },
	{ "locks", RLIMIT_LOCKS }, { "memlock", RLIMIT_MEMLOCK }, { "msgqueue", RLIMIT_MSGQUEUE },
	{ "nice", RLIMIT_NICE }, { "nofile", RLIMIT_NOFILE }, { "nproc", RLIMIT_NPROC }, { "rss", RLIMIT_RSS },
	{ "rtprio", RLIMIT_RTPRIO }, { "rttime", RLIMIT_RTTIME }, { "sigpending", RLIMIT_SIGPENDING },
	{ "stack", RLIMIT_STACK },
};

/* One limit value: a number, or -1 for unlimited. */
static int parse_rlim(const char *text, rlim_t *out)
{
	char *end;
	if (!strcmp(text, "-1") || !strcmp(text, "unlimited")) {
		*out = RLIM_INFINITY;
		return 0;
	}
	if (!*text || *text == '-')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(text, &end, 10);
	if (errno || *end)
		return -1;
	*out = (rlim_t)v;
	return 0;
}

/* "NAME:SOFT:HARD" -> setrlimit; as root, before the switch to the container's user, so a
 * hard limit may also be raised (what docker's runc does before exec). */
static void apply_ulimit(int efd, const char *item)
{
	char name[32];
	const char *c1 = strchr(item, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
	size_t i, n = sizeof rlimit_names / sizeof rlimit_names[0];
	struct rlimit rl;
	char soft[32], hard[32];
	if (!c1 || !c2 || (size_t)(c1 - item) >= sizeof name || (size_t)(c2 - c1 - 1) >= sizeof soft ||
	    strlen(c2 + 1) >= sizeof hard)
		child_fail(efd, 126, "ulimit \"%s\": want NAME:SOFT:HARD", item);
	snprintf(name, sizeof name, "%.*s", (int)(c1 - item), item);
	snprintf(soft, sizeof soft, "%.*s", (int)(c2 - c1 - 1), c1 + 1);
	snprintf(hard, sizeof hard, "%s", c2 + 1);
	for (i = 0; i < n && strcmp(name, rlimit_names[i].name); i++)
		;
	if (i == n)
		child_fail(efd, 126, "ulimit \"%s\": unknown limit %s", item, name);
	if (parse_rlim(soft, &rl.rlim_cur) < 0 || parse_rlim(hard, &rl.rlim_max) < 0)
		child_fail(efd, 126, "ulimit \"%s\": want NAME:SOFT:HARD (numbers, -1 for unlimited)", item);
	if (setrlimit(rlimit_names[i].resource, &rl) < 0)
		child_fail(efd, 126, "ulimit %s=%s:%s: %s", name, soft, hard, strerror(errno));
}

/* "N": drop capability N from the bounding set. A root process then execs with only what is
 * left (its permitted set after exec is the bounding set: the agent's inheritable set is
 * empty); a non-root user has none anyway. */
static void drop_cap(int efd, const char *item)
{
	char *end;
	long cap = strtol(item, &end, 10);
	if (!*item || *end || cap < 0 || cap > 63)
		child_fail(efd, 126, "cap_drop \"%s\": want a capability number", item);
	if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) /* EINVAL: unknown to this kernel */
		child_fail(efd, 126, "cap_drop %ld: %s", cap, strerror(errno));
}

static _Noreturn void child_main(struct run_spec *s, int in_r, int out_w, int err_w, int efd)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* we ignore SIGPIPE; the container must not inherit that */
	setsid();
	/* A TTY process is the session leader of its terminal: ^C typed on it is SIGINT for the
	 * foreground process group, and a resize (TIOCSWINSZ on the master) SIGWINCH. */
	if (s->tty && ioctl(in_r, TIOCSCTTY, 0) < 0)
		child_fail(efd, 126, "tty: cannot make the pseudo-terminal the controlling terminal: %s", strerror(errno));
	if (in_r < 0 && (in_r = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) /* before chroot: may lack /dev */
		child_fail(efd, 126, "open /dev/null: %s", strerror(errno));
	dup2(in_r, 0);
	dup2(out_w, 1);
	dup2(err_w, 2);
	if (chroot(root) < 0 || chdir("/") < 0)
		child_fail(efd, 126, "chroot %s: %s", root, strerror(errno));

	struct user_info u;
	gid_t groups[MAX_GROUPS];
	int ngroups;
	resolve_user(efd, s->user, &u, groups, &ngroups);

	const char *cwd = s->cwd && *s->cwd ? s->cwd : "/";
	mkdir_p(cwd); /* docker creates a missing WORKDIR */
	if (chdir(cwd) < 0)
		child_fail(efd, 126, "chdir to cwd (\"%s\") failed: %s", cwd, strerror(errno));

	char home[1100], host[300];
	if (!env_get(s->env, "PATH"))
		s->env[s->nenv++] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	if (!env_get(s->env, "HOME")) {
		snprintf(home, sizeof home, "HOME=%s", u.home[0] ? u.home : "/");
		s->env[s->nenv++] = home;
	}
	if (s->hostname && !env_get(s->env, "HOSTNAME")) {
		snprintf(host, sizeof host, "HOSTNAME=%s", s->hostname);
		s->env[s->nenv++] = host;
	}
	if (s->tty && !env_get(s->env, "TERM"))
		s->env[s->nenv++] = "TERM=xterm"; /* docker's default for a TTY */
	s->env[s->nenv] = NULL;

	for (int i = 0; i < s->nulimits; i++)
		apply_ulimit(efd, s->ulimits[i]);
	for (int i = 0; i < s->ncap_drops; i++)
		drop_cap(efd, s->cap_drops[i]);
	if (setgroups(ngroups, groups) < 0 || setgid(u.gid) < 0 || setuid(u.uid) < 0)
		child_fail(efd, 126, "cannot switch to user %s: %s", s->user ? s->user : "0", strerror(errno));
	exec_in_path(efd, s->argv, s->env);
}

/* ---------- container setup: RUN items net, mount, dns, readonly_root (process 1 only) ---------- */

struct net_conf {
	struct in_addr addr, mask, gw;
	int has_gw;
	char addr_text[INET_ADDRSTRLEN];
};

/* "ADDRESS/PREFIX,GATEWAY" (the gateway may be left out: no default route). */
static int parse_net(const char *spec, struct net_conf *n, char *err, size_t errlen)
{
	char buf[100], *end = NULL;
	snprintf(buf, sizeof buf, "%s", spec);
	char *gw = strchr(buf, ','), *pfx = strchr(buf, '/');
	if (gw)
		*gw++ = 0;
	if (pfx)
		*pfx++ = 0;
	long bits = pfx && *pfx ? strtol(pfx, &end, 10) : -1;
	if (bits < 0 || bits > 32 || *end || inet_pton(AF_INET, buf, &n->addr) != 1 ||
	    (gw && inet_pton(AF_INET, gw, &n->gw) != 1)) {
		snprintf(err, errlen, "net: bad value \"%s\" (want ADDRESS/PREFIX,GATEWAY)", spec);
		return -1;
	}
	n->mask.s_addr = htonl(bits ? 0xffffffffu << (32 - bits) : 0);
	n->has_gw = gw != NULL;
	inet_ntop(AF_INET, &n->addr, n->addr_text, sizeof n->addr_text);
	return 0;
}

static void set_sin(void *sa, struct in_addr a)
{
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr = a };
	memcpy(sa, &sin, sizeof sin);
}

/* eth0 by ioctl in the agent itself: no fork/exec of busybox ip on the start path. Run twice
 * (a restarted VM), every step is a no-op the second time; an existing route is fine. */
static int config_net(const struct net_conf *n, char *err, size_t errlen)
{
	struct ifreq ifr = { .ifr_name = "eth0" };
	const char *step = "socket";
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	step = "get flags";
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) {
		if (errno == ENODEV) {
			snprintf(err, errlen, "net: the VM has no network interface eth0");
			close(fd);
			return -1;
		}
		goto fail;
	}
	short flags = ifr.ifr_flags;
	step = "set address";
	set_sin(&ifr.ifr_addr, n->addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		goto fail;
	step = "set netmask";
	set_sin(&ifr.ifr_netmask, n->mask);
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		goto fail;
	step = "bring up";
	ifr.ifr_flags = flags | IFF_UP | IFF_RUNNING;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		goto fail;
	if (n->has_gw) {
		struct rtentry rt = { .rt_flags = RTF_UP | RTF_GATEWAY, .rt_dev = "eth0" };
		struct in_addr any = { INADDR_ANY };
		set_sin(&rt.rt_dst, any);
		set_sin(&rt.rt_genmask, any);
		set_sin(&rt.rt_gateway, n->gw);
		step = "add default route";
		if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			goto fail;
	}
	close(fd);
	return 0;
fail:
	snprintf(err, errlen, "net eth0: %s: %s", step, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

/*
 * "netif=MATCHMAC,NAME,MAC,ADDRESS/PREFIX": a NIC on a kvmc network (one more virtio-net
 * device). It is found by the MAC the VM was defined with (MATCHMAC: virtio-mmio probe order
 * need not follow the domain XML), named NAME (swapping names with whichever NIC has it),
 * given the container's own MAC (pool members all share their defined MACs) and its address.
 * No route beyond the subnet's own: the default route stays on eth0.
 */
struct netif_conf {
	char match[18], name[IFNAMSIZ], mac[18];
	struct in_addr addr, mask;
	char addr_text[INET_ADDRSTRLEN];
};

static int parse_mac(const char *text, unsigned char mac[6])
{
	return sscanf(text, "%2hhx:%2hhx:%2hhx:%2hhx:%2hhx:%2hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4],
		      &mac[5]) == 6 && strlen(text) == 17;
}

static int parse_netif(const char *spec, struct netif_conf *n, char *err, size_t errlen)
{
	char buf[120], *f[4], *save = NULL, *end = NULL;
	unsigned char mac[6];
	int k = 0;
	snprintf(buf, sizeof buf, "%s", spec);
	for (char *t = strtok_r(buf, ",", &save); t && k < 4; t = strtok_r(NULL, ",", &save))
		f[k++] = t;
	char *pfx = k == 4 ? strchr(f[3], '/') : NULL;
	if (pfx)
		*pfx++ = 0;
	long bits = pfx && *pfx ? strtol(pfx, &end, 10) : -1;
	if (k != 4 || bits < 1 || bits > 32 || *end || !parse_mac(f[0], mac) || !parse_mac(f[2], mac) ||
	    !*f[1] || strlen(f[1]) >= IFNAMSIZ || inet_pton(AF_INET, f[3], &n->addr) != 1) {
		snprintf(err, errlen, "netif: bad value \"%s\" (want MATCHMAC,NAME,MAC,ADDRESS/PREFIX)", spec);
		return -1;
	}
	snprintf(n->match, sizeof n->match, "%s", f[0]);
	snprintf(n->name, sizeof n->name, "%s", f[1]);
	snprintf(n->mac, sizeof n->mac, "%s", f[2]);
	n->mask.s_addr = htonl(0xffffffffu << (32 - bits));
	inet_ntop(AF_INET, &n->addr, n->addr_text, sizeof n->addr_text);
	return 0;
}

/* The interface whose hardware address is MAC (either case), into name; 0 if none. */
static int find_nic(const char *mac, char *name, size_t namelen)
{
	char path[300], buf[32];
	for (int try = 0; try < 50; try++) { /* probed before the agent runs; covers a slow probe */
		DIR *d = opendir("/sys/class/net");
		struct dirent *e;
		int found = 0;
		while (d && !found && (e = readdir(d))) {
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/net/%s/address", e->d_name);
			FILE *f = fopen(path, "re");
			if (f && fgets(buf, sizeof buf, f) && (buf[strcspn(buf, "\n")] = 0, !strcasecmp(buf, mac))) {
				snprintf(name, namelen, "%.15s", e->d_name);
				found = 1;
			}
			if (f)
				fclose(f);
		}
		if (d)
			closedir(d);
		if (found)
			return 1;
		usleep(20000);
	}
	return 0;
}

static int rename_nic(int fd, const char *from, const char *to)
{
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%.15s", from);
	snprintf(ifr.ifr_newname, sizeof ifr.ifr_newname, "%.15s", to);
	return ioctl(fd, SIOCSIFNAME, &ifr);
}

static int config_netif(const struct netif_conf *n, char *err, size_t errlen)
{
	char have[IFNAMSIZ];
	const char *step = "socket";
	struct ifreq ifr = { 0 };
	unsigned char mac[6];
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	if (!find_nic(n->match, have, sizeof have)) {
		snprintf(err, errlen, "netif: the VM has no network interface with MAC %s", n->match);
		close(fd);
		return -1;
	}
	if (strcmp(have, n->name)) { /* swap names with the NIC that has ours, if any */
		step = "rename";
		snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", n->name);
		int taken = ioctl(fd, SIOCGIFFLAGS, &ifr) == 0;
		if ((taken && rename_nic(fd, n->name, "kvmcswap") < 0) || rename_nic(fd, have, n->name) < 0 ||
		    (taken && rename_nic(fd, "kvmcswap", have) < 0))
			goto fail;
	}
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", n->name);
	step = "set MAC";
	parse_mac(n->mac, mac);
	ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
	memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
	if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
		goto fail;
	step = "set address";
	set_sin(&ifr.ifr_addr, n->addr);
	if (ioctl(fd, SIOCSIFADDR, &ifr) < 0)
		goto fail;
	step = "set netmask";
	set_sin(&ifr.ifr_netmask, n->mask);
	if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
		goto fail;
	step = "bring up";
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		goto fail;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
		goto fail;
	close(fd);
	return 0;
fail:
	snprintf(err, errlen, "netif %s: %s: %s", n->name, step, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

/* "@SERIAL": the virtio-blk disk whose /sys/block/vdX/serial reads SERIAL; polled every 20 ms,
 * up to `tries` times (a disk can still be probing when the agent looks). */
static int find_disk(const char *serial, char *dev, size_t devlen, int tries)
{
	char path[300], buf[64];
	for (int try = 0; try < tries; try++) {
		DIR *d = opendir("/sys/block");
		struct dirent *e;
		int found = 0;
		while (d && !found && (e = readdir(d))) {
			if (strncmp(e->d_name, "vd", 2))
				continue;
			snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
			FILE *f = fopen(path, "re");
			if (f && fgets(buf, sizeof buf, f) && (buf[strcspn(buf, "\n")] = 0, !strcmp(buf, serial))) {
				snprintf(dev, devlen, "/dev/%.40s", e->d_name);
				found = 1;
			}
			if (f)
				fclose(f);
		}
		if (d)
			closedir(d);
		if (found)
			return 1;
		usleep(20000);
	}
	return 0;
}

/*
 * mkdir -p inside the chroot, refusing any path through a /proc magic link: /proc/1/root is
 * the agent's root, the one way a symlink in the image could lead out of the container's.
 */
static int mkdir_in_root(char *path)
{
	for (char *s = path + 1;; s++) {
		if (*s && *s != '/')
			continue;
		char c = *s;
		*s = 0;
		struct open_how how = { .flags = O_PATH | O_CLOEXEC, .resolve = RESOLVE_NO_MAGICLINKS };
		int fd = -1;
		if (mkdir(path, 0755) == 0 || errno == EEXIST)
			fd = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
		*s = c;
		if (fd >= 0)
			close(fd);
		else if (errno != ENOSYS) /* no openat2 (kernel < 5.6): plain mkdir -p */
			return -1;
		if (!c)
			return 0;
	}
}

struct mount_item {
	char *fstype, *source, *options, *target;
	char dev[48]; /* /dev/vdX for an "@SERIAL" source */
};

static const struct { const char *name; unsigned long flag; int clear; } mount_flags[] = {
	{ "ro", MS_RDONLY, 0 }, { "rw", MS_RDONLY, 1 }, { "nosuid", MS_NOSUID, 0 },
	{ "nodev", MS_NODEV, 0 }, { "noexec", MS_NOEXEC, 0 }, { "noatime", MS_NOATIME, 0 },
	{ "relatime", MS_RELATIME, 0 }, { "sync", MS_SYNCHRONOUS, 0 },
	/* docker's --tmpfs /x:exec undoes its default noexec (and likewise suid, dev) */
	{ "exec", MS_NOEXEC, 1 }, { "suid", MS_NOSUID, 1 }, { "dev", MS_NODEV, 1 },
};

static void do_mount(int efd, struct mount_item *m)
{
	unsigned long flags = 0;
	char *data = calloc(1, strlen(m->options) + 1);
	if (!data)
		child_fail(efd, 126, "mount %s: out of memory", m->target);
	if (strcmp(m->options, "-")) /* "-" or "": no options */
		for (char *o = strtok(m->options, ","); o; o = strtok(NULL, ",")) {
			size_t i = 0, n = sizeof mount_flags / sizeof mount_flags[0];
			while (i < n && strcmp(o, mount_flags[i].name))
				i++;
			if (i < n && mount_flags[i].clear)
				flags &= ~mount_flags[i].flag;
			else if (i < n)
				flags |= mount_flags[i].flag;
			else /* filesystem options (mode=1777,size=64m) go to the kernel as they are */
				strcat(strcat(data, *data ? "," : ""), o);
		}
	const char *src = m->dev[0] ? m->dev : m->source;
	if (mkdir_in_root(m->target) < 0 || mount(src, m->target, m->fstype, flags, *data ? data : NULL) < 0)
		child_fail(efd, 126, "mount %s (%s %s): %s", m->target, m->fstype, m->source,
			   errno == ELOOP ? "symlink loop or /proc link in the path" : strerror(errno));
	free(data);
}

/* Replace /etc/NAME by rename: that replaces a symlink (resolv.conf often is one) instead of
 * writing through it, and never leaves a half-written file. */
static void replace_etc(int efd, const char *name, const char *text)
{
	char path[64], tmp[80];
	snprintf(path, sizeof path, "/etc/%s", name);
	snprintf(tmp, sizeof tmp, "/etc/.%s.kvmc", name);
	mkdir("/etc", 0755);
	unlink(tmp);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
	size_t len = strlen(text);
	int ok = fd >= 0 && fchmod(fd, 0644) == 0 && write(fd, text, len) == (ssize_t)len;
	if (fd >= 0 && close(fd) < 0)
		ok = 0;
	if (!ok || rename(tmp, path) < 0) {
		int e = errno;
		unlink(tmp);
		child_fail(efd, 126, "write %s: %s", path, strerror(e));
	}
}

/*
 * /etc/resolv.conf and /etc/hosts as docker gives them: files of the agent's own tmpfs,
 * bind-mounted over the image's. The first write into the container's ext4 root cost ~20 ms
 * of every container start under TCG (block and inode bitmaps read from disk, a journal
 * transaction); a tmpfs file and a bind mount cost neither. The container reads and writes
 * them as before (a rename over them gets EBUSY, as in docker). Used only where the image has
 * a regular file (the common case: docker's images and kvmc's builder have one); a symlink or
 * a missing file is replaced in the rootfs as before (replace_etc), and so is everything when
 * the kernel lacks open_tree/move_mount.
 */
#define ETC_TMPFS "/run/kvmc-etc"  /* in the agent's root (the initramfs in a VM), not the container's */
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x04
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x40
#endif

struct etc_file {
	const char *name;
	int fd;   /* the tmpfs file, written once the text is known (after the chroot) */
	int tree; /* a detached bind mount of it (open_tree), attached by move_mount */
	int bound;
};

/* Before the chroot: a fresh tmpfs in the agent's root with an empty NAME, and a detached
 * bind mount of it. Any failure leaves fd/tree at -1: replace_etc then does the job. */
static void etc_prepare(struct etc_file *f)
{
	char path[80];
	f->fd = f->tree = -1;
	f->bound = 0;
	if (mkdir("/run", 0755) < 0 && errno != EEXIST)
		return;
	if (mkdir(ETC_TMPFS, 0755) < 0 && errno != EEXIST)
		return;
	/* One tmpfs per container setup (a VM sets up once per boot): mounted over any older one. */
	static int mounted;
	if (!mounted && mount("tmpfs", ETC_TMPFS, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755") < 0)
		return;
	mounted = 1;
	snprintf(path, sizeof path, ETC_TMPFS "/%s", f->name);
	f->fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
	if (f->fd < 0)
		return;
	fchmod(f->fd, 0644);
	f->tree = syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE | O_CLOEXEC);
	if (f->tree < 0) {
		close(f->fd);
		f->fd = -1;
	}
}

/* In the chroot: give the container /etc/NAME with TEXT (see etc_prepare). */
static void write_etc(int efd, struct etc_file *f, const char *text)
{
	char path[64];
	snprintf(path, sizeof path, "/etc/%s", f->name);
	if (f->tree >= 0) {
		/* The target is opened without following a final symlink or any /proc magic link
		 * (one in the image could lead out of the rootfs): a regular file gets the bind. */
		struct open_how how = { .flags = O_PATH | O_NOFOLLOW | O_CLOEXEC, .resolve = RESOLVE_NO_MAGICLINKS };
		int target = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
		struct stat st;
		size_t len = strlen(text);
		if (target >= 0 && fstat(target, &st) == 0 && S_ISREG(st.st_mode) &&
		    pwrite(f->fd, text, len, 0) == (ssize_t)len &&
		    syscall(SYS_move_mount, f->tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) == 0)
			f->bound = 1;
		if (target >= 0)
			close(target);
		if (f->bound)
			return;
	}
	replace_etc(efd, f->name, text);
}

/* Read-only root: the bound files become read-only too (they are mounts of their own). */
static void etc_readonly(int efd, struct etc_file *f)
{
	char path[64];
	snprintf(path, sizeof path, "/etc/%s", f->name);
	if (f->bound && mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		child_fail(efd, 126, "read-only root: remount %s: %s", path, strerror(errno));
}

/* Append to a fixed buffer; what does not fit is dropped (glibc reads 3 nameservers anyway). */
static void append(char *buf, size_t size, const char *fmt, ...)
{
	size_t used = strlen(buf);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf + used, size - used, fmt, ap);
	va_end(ap);
}

/* One word of resolv.conf or hosts: printable, no blank (a newline would add lines of its own). */
static int word_ok(const char *w)
{
	if (!*w)
		return 0;
	for (; *w; w++)
		if ((unsigned char)*w <= ' ' || *w == 0x7f || *w == '#')
			return 0;
	return 1;
}

static _Noreturn void setup_child(struct run_spec *s, const char *host_addr, int efd)
{
	struct mount_item *ms = calloc(s->nmounts + 1, sizeof *ms);
	if (!ms)
		child_fail(efd, 126, "container setup: out of memory");
	/* Parse, and find the disks while /sys is still the agent's: the rootfs may lack one. */
	for (int i = 0; i < s->nmounts; i++) {
		struct mount_item *m = &ms[i];
		char *c1 = strchr(s->mounts[i], ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
		char *c3 = c2 ? strchr(c2 + 1, ':') : NULL;
		if (!c3 || c1 == s->mounts[i] || !c3[1])
			child_fail(efd, 126, "mount \"%s\": want FSTYPE:SOURCE:OPTIONS:TARGET", s->mounts[i]);
		*c1 = *c2 = *c3 = 0;
		*m = (struct mount_item){ .fstype = s->mounts[i], .source = c1 + 1, .options = c2 + 1,
					  .target = c3 + 1 };
		if (m->source[0] == '@' && !find_disk(m->source + 1, m->dev, sizeof m->dev, 50))
			child_fail(efd, 126, "mount %s (%s %s): no disk with serial %s", m->target, m->fstype,
				   m->source, m->source + 1);
	}
	struct etc_file resolv = { .name = "resolv.conf", .fd = -1, .tree = -1 };
	struct etc_file hosts = { .name = "hosts", .fd = -1, .tree = -1 };
	if (s->ndns || s->ndns_search || s->ndns_options)
		etc_prepare(&resolv);
	if (host_addr || s->nhosts)
		etc_prepare(&hosts);
	/* /etc/hostname says the container's hostname, as docker's bind mount of it does (the
	 * image's own file, "kvmc" in kvmc's busybox, would otherwise contradict `hostname`). */
	struct etc_file hostname = { .name = "hostname", .fd = -1, .tree = -1 };
	if (s->hostname && *s->hostname)
		etc_prepare(&hostname);
	if (chroot(root) < 0 || chdir("/") < 0)
		child_fail(efd, 126, "chroot %s: %s", root, strerror(errno));
	for (int i = 0; i < s->nmounts; i++)
		do_mount(efd, &ms[i]);

	char text[4096] = "";
	unsigned char a[16];
	for (int i = 0; i < s->ndns; i++) {
		if (inet_pton(AF_INET, s->dns[i], a) != 1 && inet_pton(AF_INET6, s->dns[i], a) != 1)
			child_fail(efd, 126, "dns: bad address \"%s\"", s->dns[i]);
		append(text, sizeof text, "nameserver %s\n", s->dns[i]);
	}
	if (s->ndns_search)
		append(text, sizeof text, "search");
	for (int i = 0; i < s->ndns_search; i++) {
		if (!word_ok(s->dns_search[i]))
			child_fail(efd, 126, "dns_search: bad domain \"%s\"", s->dns_search[i]);
		append(text, sizeof text, " %s%s", s->dns_search[i], i + 1 == s->ndns_search ? "\n" : "");
	}
	if (s->ndns_options)
		append(text, sizeof text, "options");
	for (int i = 0; i < s->ndns_options; i++) {
		if (!word_ok(s->dns_options[i]))
			child_fail(efd, 126, "dns_option: bad option \"%s\"", s->dns_options[i]);
		append(text, sizeof text, " %s%s", s->dns_options[i], i + 1 == s->ndns_options ? "\n" : "");
	}
	if (s->ndns || s->ndns_search || s->ndns_options)
		write_etc(efd, &resolv, text);
	if (host_addr || s->nhosts) {
		snprintf(text, sizeof text, "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
		for (int i = 0; i < s->nhosts; i++) {
			/* "IP NAME [NAME...]": one line of /etc/hosts, checked word by word */
			char line[600], *save = NULL, *ip;
			snprintf(line, sizeof line, "%s", s->hosts[i]);
			ip = strtok_r(line, " ", &save);
			char *name = ip ? strtok_r(NULL, " ", &save) : NULL;
			if (!ip || !name || (inet_pton(AF_INET, ip, a) != 1 && inet_pton(AF_INET6, ip, a) != 1))
				child_fail(efd, 126, "host \"%s\": want IP NAME [NAME...]", s->hosts[i]);
			for (; name; name = strtok_r(NULL, " ", &save))
				if (!word_ok(name))
					child_fail(efd, 126, "host \"%s\": bad name \"%s\"", s->hosts[i], name);
			append(text, sizeof text, "%s\n", s->hosts[i]);
		}
		if (host_addr && s->hostname && *s->hostname)
			append(text, sizeof text, "%s %s\n", host_addr, s->hostname);
		write_etc(efd, &hosts, text);
	}
	if (s->hostname && *s->hostname) {
		snprintf(text, sizeof text, "%s\n", s->hostname);
		write_etc(efd, &hostname, text);
	}

	/* Per-mount read-only (a bind remount, like runc's): the container gets EROFS, mounts
	 * under / keep their own flags, and the flags the root had (nosuid...) are kept (ST_* ==
	 * MS_* for these). A superblock remount would also hit every other mount of that fs. */
	if (s->readonly_root) {
		struct statvfs sv;
		unsigned long keep = statvfs("/", &sv) < 0 ? 0 : sv.f_flag &
			(ST_NOSUID | ST_NODEV | ST_NOEXEC | ST_NOATIME | ST_NODIRATIME | ST_RELATIME);
		if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, NULL) < 0)
			child_fail(efd, 126, "read-only root: remount %s: %s", root, strerror(errno));
		etc_readonly(efd, &resolv);
		etc_readonly(efd, &hosts);
		etc_readonly(efd, &hostname);
	}
	_exit(0);
}

/*
 * Mounts, resolv.conf/hosts and the read-only remount happen in a child chroot'ed into the
 * rootfs, so the image's symlinks resolve inside it; the VM has one mount namespace, so the
 * mounts outlive the child. It is waited for right here: the reap loop never sees it.
 */
static int setup_container(struct run_spec *s, char *err, size_t errlen)
{
	struct net_conf net;
	struct netif_conf nif, first;
	/* netifs first: their renames may move the name eth0 onto the user-mode NIC */
	for (int i = 0; i < s->nnetifs; i++) {
		if (parse_netif(s->netifs[i], &nif, err, errlen) < 0 || config_netif(&nif, err, errlen) < 0)
			return -1;
		if (i == 0)
			first = nif;
	}
	if (s->net && (parse_net(s->net, &net, err, errlen) < 0 || config_net(&net, err, errlen) < 0))
		return -1;
	if (boot_debug)
		logmsg("container setup: network done at %lld ms uptime", (long long)uptime_ms());
	if (!s->nmounts && !s->ndns && !s->readonly_root && !s->net && !s->nnetifs && !s->nhosts && !s->ndns_search &&
	    !s->ndns_options)
		return 0;
	/* /etc/hosts names the container by its address on its (first) kvmc network, as docker's */
	const char *host_addr = s->nnetifs ? first.addr_text : s->net ? net.addr_text : NULL;
	int p[2], st = 0;
	if (pipe2(p, O_CLOEXEC) < 0) {
		snprintf(err, errlen, "container setup: pipe: %s", strerror(errno));
		return -1;
	}
	/* vfork: the agent waits for this child anyway, and a fork's copy-on-write page faults in
	 * child and parent cost ~10 ms of every container start under TCG. Safe here: the parent
	 * is suspended (single-threaded, not inside malloc), the child only changes memory the
	 * parent no longer reads (this RUN's parsed items, a few leaked allocations) and always
	 * ends in _exit (child_fail or below); chroot and close are not shared (no CLONE_FS,
	 * CLONE_FILES). */
	pid_t pid = vfork();
	if (pid == 0) {
		close(p[0]);
		setup_child(s, host_addr, p[1]);
	}
	close(p[1]);
	if (pid < 0) {
		close(p[0]);
		snprintf(err, errlen, "container setup: fork: %s", strerror(errno));
		return -1;
	}
	struct exec_report r;
	size_t got = 0;
	ssize_t n;
	while (got < sizeof r && ((n = read(p[0], (char *)&r + got, sizeof r - got)) > 0 || (n < 0 && errno == EINTR)))
		got += n > 0 ? n : 0;
	close(p[0]);
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	if (got == sizeof r) {
		r.msg[sizeof r.msg - 1] = 0;
		snprintf(err, errlen, "%s", r.msg);
		return -1;
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st)) {
		snprintf(err, errlen, "container setup failed (wait status %d)", st);
		return -1;
	}
	return 0;
}

/* ---------- parent side of the frames ---------- */

static void add_seed(const char *hex)
{
	size_t n = strlen(hex) / 2;
	struct rand_pool_info *info = calloc(1, sizeof *info + n + 4);
	if (!info)
		return;
	unsigned char *bytes = (unsigned char *)info->buf;
	for (size_t i = 0; i < n; i++)
		sscanf(hex + 2 * i, "%2hhx", &bytes[i]);
	info->entropy_count = n * 8;
	info->buf_size = n;
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	int ok = fd >= 0 && ioctl(fd, RNDADDENTROPY, info) == 0;
	if (fd >= 0 && write(fd, bytes, n) < 0)
		ok = 0;
	/* Mixing entropy in does not change what the CRNG hands out until its next scheduled
	 * reseed (up to a minute): after a snapshot restore, clones of one state would read the
	 * same "random" bytes until then. Force the reseed now. */
	if (fd >= 0 && ioctl(fd, RNDRESEEDCRNG) < 0)
		ok = 0;
	if (!ok && is_pid1)
		logmsg("seeding the RNG failed: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
	free(info);
}

/*
 * A pseudo-terminal from the container's own devpts instance (ROOT/dev/pts, mounted with
 * newinstance by the init), so that the process sees its terminal as /dev/pts/N. Returns the
 * master (O_CLOEXEC) and stores the slave in *slave, or -1 with a message in err.
 */
static int open_pty(int *slave, const char *winsize, char *err, size_t errlen)
{
	char path[4200];
	const char *step = "open";
	snprintf(path, sizeof path, "%s/dev/pts/ptmx", strcmp(root, "/") ? root : "");
	int m = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC), unlock = 0;
	if (m < 0) {
		snprintf(path, sizeof path, "%s/dev/ptmx", strcmp(root, "/") ? root : "");
		m = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
	}
	if (m < 0)
		goto fail;
	step = "unlock";
	if (ioctl(m, TIOCSPTLCK, &unlock) < 0)
		goto fail;
	step = "open the slave of";
	*slave = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*slave < 0 && errno == EINVAL) { /* kernels before 4.13: by number, in the same instance */
		int n;
		if (ioctl(m, TIOCGPTN, &n) == 0) {
			snprintf(path, sizeof path, "%s/dev/pts/%d", strcmp(root, "/") ? root : "", n);
			*slave = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
		}
	}
	if (*slave < 0)
		goto fail;
	unsigned rows = 0, cols = 0;
	if (winsize && sscanf(winsize, "%ux%u", &rows, &cols) == 2 && rows && cols) {
		struct winsize ws = { .ws_row = rows, .ws_col = cols };
		ioctl(m, TIOCSWINSZ, &ws);
	}
	return m;
fail:;
	int e = errno;
	snprintf(err, errlen, "tty: cannot allocate a pseudo-terminal: %s %.300s: %s", step, path, strerror(e));
	if (m >= 0)
		close(m);
	return -1;
}

/* A RUN that cannot even fork: report it like an exec failure so the host gets its EXIT. */
static void run_failed(uint16_t id, const char *msg)
{
	send_text(T_ERROR, id, "%s", msg);
	send_exit(id, 0, 126);
}

static void do_run(uint16_t id, int flags, const unsigned char *payload, size_t len)
{
	struct proc *p = NULL;
	if (id == 0 || find_proc(id)) { /* no EXIT: that would be mistaken for the live one's */
		send_text(T_ERROR, id, "RUN: process id %u is reserved or already running", id);
		return;
	}
	for (int i = 0; i < MAX_PROCS && !p; i++)
		if (!procs[i].used)
			p = &procs[i];
	if (!p) {
		run_failed(id, "RUN: too many processes (max 16)");
		return;
	}

	/* Copy: the payload lives in the input buffer, and items need a trailing NUL. */
	char *buf = malloc(len + 1);
	size_t nitems = 0;
	if (!buf) {
		run_failed(id, "RUN: out of memory");
		return;
	}
	memcpy(buf, payload, len);
	buf[len] = 0;
	for (size_t i = 0; i <= len; i++)
		nitems += buf[i] == 0;
	struct run_spec s = { .argv = calloc(nitems + 1, sizeof(char *)),
			      .env = calloc(nitems + 5, sizeof(char *)),
			      .mounts = calloc(nitems + 1, sizeof(char *)),
			      .dns = calloc(nitems + 1, sizeof(char *)),
			      .netifs = calloc(nitems + 1, sizeof(char *)),
			      .ulimits = calloc(nitems + 1, sizeof(char *)),
			      .cap_drops = calloc(nitems + 1, sizeof(char *)),
			      .hosts = calloc(nitems + 1, sizeof(char *)),
			      .dns_search = calloc(nitems + 1, sizeof(char *)),
			      .dns_options = calloc(nitems + 1, sizeof(char *)) };
	int argc = 0, want_stdin = 0, stop_signal = 0;
	int allocated = s.argv && s.env && s.mounts && s.dns && s.netifs && s.ulimits && s.cap_drops && s.hosts &&
			s.dns_search && s.dns_options;
	long proto = 1; /* protocol 1 hosts sent no proto item */
	const char *winsize = NULL;
	s.tty = flags & RUN_TTY;
	for (char *it = buf, *next; allocated && it < buf + len; it = next) {
		next = it + strlen(it) + 1; /* before we split at '=' */
		char *val = strchr(it, '=');
		if (!val)
			continue;
		*val++ = 0;
		if (!strcmp(it, "arg")) s.argv[argc++] = val;
		else if (!strcmp(it, "env")) s.env[s.nenv++] = val;
		else if (!strcmp(it, "cwd")) s.cwd = val;
		else if (!strcmp(it, "user")) s.user = val;
		else if (!strcmp(it, "hostname")) s.hostname = val;
		else if (!strcmp(it, "stdin")) want_stdin = !strcmp(val, "1");
		else if (!strcmp(it, "seed")) add_seed(val);
		else if (!strcmp(it, "mount")) s.mounts[s.nmounts++] = val;
		else if (!strcmp(it, "readonly_root")) s.readonly_root = !strcmp(val, "1");
		else if (!strcmp(it, "net")) s.net = val;
		else if (!strcmp(it, "dns")) s.dns[s.ndns++] = val;
		else if (!strcmp(it, "netif")) s.netifs[s.nnetifs++] = val;
		else if (!strcmp(it, "proto")) proto = atol(val);
		else if (!strcmp(it, "winsize")) winsize = val;
		else if (!strcmp(it, "dns_search")) s.dns_search[s.ndns_search++] = val;
		else if (!strcmp(it, "dns_option")) s.dns_options[s.ndns_options++] = val;
		else if (!strcmp(it, "host")) s.hosts[s.nhosts++] = val;
		else if (!strcmp(it, "ulimit")) s.ulimits[s.nulimits++] = val;
		else if (!strcmp(it, "cap_drop")) s.cap_drops[s.ncap_drops++] = val;
		else if (!strcmp(it, "stop_signal")) stop_signal = atoi(val);
		else if (!strcmp(it, "time_ns")) {
			long long ns = atoll(val);
			struct timespec ts = { ns / 1000000000, ns % 1000000000 };
			if (clock_settime(CLOCK_REALTIME, &ts) < 0)
				logmsg("clock_settime: %s", strerror(errno));
		} else
			logmsg("RUN: ignoring unknown key %s", it);
	}
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 }, ex[2], master = -1, slave = -1, tty_fd = -1;
	if (proto != PROTOCOL) {
		char why[200];
		snprintf(why, sizeof why, "the host speaks kvmc-agent protocol %ld and this guest agent speaks %d: "
			 "the guest artefacts and kvmc must come from the same version (rebuild them with images/build.sh)",
			 proto, PROTOCOL);
		run_failed(id, why);
		goto done;
	}
	if (!allocated || argc == 0) {
		run_failed(id, allocated ? "RUN: no arg given" : "RUN: out of memory");
		goto done;
	}
	if (s.hostname && sethostname(s.hostname, strlen(s.hostname)) < 0)
		logmsg("sethostname: %s", strerror(errno));
	int setup = s.nmounts || s.ndns || s.net || s.nnetifs || s.readonly_root || s.nhosts || s.ndns_search ||
		    s.ndns_options || (s.hostname && id == 1);
	if ((setup || stop_signal) && id != 1) {
		logmsg("RUN %u: mount, readonly_root, net and dns apply to process 1 only: ignored", id);
	} else if (setup) {
		char why[600];
		int64_t setup_ms = uptime_ms();
		if (setup_container(&s, why, sizeof why) < 0) {
			run_failed(id, why);
			goto done;
		}
		if (boot_debug)
			logmsg("RUN %u: container setup from %lld to %lld ms uptime", id, (long long)setup_ms,
			       (long long)uptime_ms());
	}
	if (s.tty) {
		/* One stream, as docker's TTY: the master is read as stdout, written as stdin (a
		 * dup, so that closing stdin never closes the output) and kept for resizes. */
		char why[600];
		if ((master = open_pty(&slave, winsize, why, sizeof why)) < 0) {
			run_failed(id, why);
			goto done;
		}
		in[0] = out[1] = err[1] = slave;
		out[0] = master;
		in[1] = fcntl(master, F_DUPFD_CLOEXEC, 3);
		tty_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		if (in[1] < 0 || tty_fd < 0 || pipe2(ex, O_CLOEXEC) < 0) {
			int fds[] = { master, slave, in[1], tty_fd };
			for (unsigned i = 0; i < sizeof fds / sizeof fds[0]; i++)
				if (fds[i] >= 0)
					close(fds[i]);
			run_failed(id, "RUN: out of file descriptors");
			goto done;
		}
	} else if ((want_stdin && pipe2(in, O_CLOEXEC) < 0) || pipe2(out, O_CLOEXEC) < 0 ||
		   pipe2(err, O_CLOEXEC) < 0 || pipe2(ex, O_CLOEXEC) < 0) {
		run_failed(id, "RUN: pipe failed"); /* fd leak on this path is acceptable: EMFILE */
		goto done;
	}
	int64_t fork_ms = uptime_ms();
	pid_t pid = fork();
	if (pid == 0)
		child_main(&s, in[0], out[1], err[1], ex[1]);
	if (s.tty) {
		close(slave); /* the child's now: the master reads EIO once every holder closed it */
	} else {
		close(out[1]);
		close(err[1]);
		if (in[0] >= 0)
			close(in[0]);
	}
	close(ex[1]);
	if (pid < 0) {
		close(out[0]), close(ex[0]);
		if (err[0] >= 0)
			close(err[0]);
		if (in[1] >= 0)
			close(in[1]);
		if (tty_fd >= 0)
			close(tty_fd);
		run_failed(id, "RUN: fork failed");
		goto done;
	}
	*p = (struct proc){ .used = 1, .id = id, .pid = pid, .exec_fd = ex[0], .out_fd = out[0],
			    .err_fd = err[0], .in_fd = in[1], .tty_fd = tty_fd, .fork_ms = fork_ms };
	set_nonblock(out[0]);
	if (err[0] >= 0)
		set_nonblock(err[0]);
	set_nonblock(ex[0]);
	if (in[1] >= 0)
		set_nonblock(in[1]);
	pgids[npgids++ % 64] = pid; /* setsid() in the child makes pid its group id */
	if (id == 1) {
		main_started = 1;
		main_pid = pid;
		main_stop_signal = stop_signal > 0 && stop_signal < NSIG ? stop_signal : SIGTERM;
	}
	if (shutdown_requested) /* a RUN racing a SHUTDOWN loses */
		kill_proc(p, id == 1 ? main_stop_signal : SIGTERM);
done:
	free(s.argv);
	free(s.env);
	free(s.mounts);
	free(s.dns);
	free(s.netifs);
	free(s.ulimits);
	free(s.cap_drops);
	free(s.hosts);
	free(s.dns_search);
	free(s.dns_options);
	free(buf);
}

static void close_stdin(struct proc *p)
{
	if (p->in_fd >= 0)
		close(p->in_fd);
	p->in_fd = -1;
	stdin_queued -= p->in_len;
	free(p->in_buf);
	p->in_buf = NULL;
	p->in_len = 0;
}

static void do_stdin_bytes(struct proc *p, const unsigned char *data, size_t len);

static void do_stdin(struct proc *p, const unsigned char *data, size_t len)
{
	if (!p || p->in_fd < 0 || p->in_eof)
		return;
	if (len == 0 && p->tty_fd >= 0) {
		/* A terminal's input cannot be closed without hanging it up: end it as a user at the
		 * terminal does, with its EOF character (^D unless the process changed it). */
		struct termios t;
		unsigned char eof = tcgetattr(p->tty_fd, &t) == 0 ? t.c_cc[VEOF] : 4;
		data = &eof;
		len = 1;
		do_stdin_bytes(p, data, len);
		return;
	}
	if (len == 0) {
		p->in_eof = 1;
		if (p->in_len == 0)
			close_stdin(p);
		return;
	}
	do_stdin_bytes(p, data, len);
}

static void do_stdin_bytes(struct proc *p, const unsigned char *data, size_t len)
{
	char *nb = realloc(p->in_buf, p->in_len + len);
	if (!nb) {
		logmsg("stdin for %u dropped: out of memory", p->id);
		return;
	}
	memcpy(nb + p->in_len, data, len);
	p->in_buf = nb;
	p->in_len += len;
	stdin_queued += len;
}

static void flush_stdin(struct proc *p)
{
	ssize_t n = write(p->in_fd, p->in_buf, p->in_len);
	if (n < 0 && errno != EAGAIN && errno != EINTR) {
		close_stdin(p); /* EPIPE: the process stopped reading; drop the rest */
		return;
	}
	if (n > 0) {
		memmove(p->in_buf, p->in_buf + n, p->in_len - n);
		p->in_len -= n;
		stdin_queued -= n;
	}
	if (p->in_len == 0 && p->in_eof)
		close_stdin(p);
}

static void begin_shutdown(uint32_t timeout_s)
{
	shutdown_requested = 1;
	shutdown_deadline = uptime_ms() + (int64_t)timeout_s * 1000;
	for (int i = 0; i < MAX_PROCS; i++) /* the main process gets its stop signal (docker's --stop-signal) */
		if (procs[i].used)
			kill_proc(&procs[i], procs[i].id == 1 ? main_stop_signal : SIGTERM);
}

/* REATTACH from a host that connects to a running VM (a new monitor after the old one died):
 * answer with TABLE, the processes as they stand at that point of the stream, ahead of every
 * frame not yet begun, so the host can find where the stream starts making sense again. */
static void do_reattach(const unsigned char *nonce, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	char text[64 + 128 + MAX_PROCS * 96 + 96];
	size_t n = 0;
	if (len < 8 || len > 32) {
		logmsg("REATTACH: a nonce of %zu bytes (want 8-32): ignored", len);
		return;
	}
	n += snprintf(text + n, sizeof text - n, "nonce=");
	for (size_t i = 0; i < len; i++) {
		text[n++] = hex[nonce[i] >> 4];
		text[n++] = hex[nonce[i] & 15];
	}
	n += snprintf(text + n, sizeof text - n, " proto=%d dropped=%llu dropped_other=%llu\n", PROTOCOL,
		      (unsigned long long)dropped_main, (unsigned long long)dropped_other);
	dropped_main = dropped_other = 0;
	/* Process 1's EXIT counts as said if it was written (towards whichever host was there) or
	 * is the frame being written now, which stays ahead of the TABLE. */
	struct frame *head = outq_head;
	int before_table = head && head->off > 0;
	int exit_said = main_exit_sent && !main_acked &&
			(main_exit_written || (before_table && head == main_exit_frame));
	if (exit_said) {
		unsigned kind = main_exit_payload[0];
		n += snprintf(text + n, sizeof text - n, "id=1 pid=%d state=exited exit=%u:%u\n", (int)main_pid,
			      kind, get_be32(main_exit_payload + 1));
	} else if (main_exit_sent && !main_acked) { /* its slot is free, its EXIT follows the TABLE */
		n += snprintf(text + n, sizeof text - n, "id=1 pid=%d state=running\n", (int)main_pid);
	}
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &procs[i];
		if (p->used)
			n += snprintf(text + n, sizeof text - n, "id=%u pid=%d state=%s\n", p->id, (int)p->pid,
				      p->exec_fd >= 0 ? "starting" : "running");
	}
	struct frame *f = new_frame(T_TABLE, 0, text, n < sizeof text ? n : sizeof text - 1);
	if (!f)
		return;
	if (before_table) { /* after the frame being written */
		f->next = head->next;
		head->next = f;
		if (outq_tail == head)
			outq_tail = f;
	} else {
		f->next = outq_head;
		outq_head = f;
		if (!outq_tail)
			outq_tail = f;
	}
	outq_bytes += f->size;
	if (exit_said) { /* written (or about to be) once more, in the TABLE: wait for its ack again */
		main_exit_written = 1;
		if (main_exit_frame == head)
			main_exit_frame = NULL;
		end_timer_after_exit();
	}
	flush_out();
}

static void dispatch(int type, int flags, uint16_t id, const unsigned char *payload, size_t len)
{
	struct proc *p = find_proc(id);
	switch (type) {
	case T_RUN:
		do_run(id, flags, payload, len);
		break;
	case T_RESIZE: /* the kernel sends SIGWINCH to the terminal's foreground process group */
		if (p && p->tty_fd >= 0 && len == 4) {
			struct winsize ws = { .ws_row = payload[0] << 8 | payload[1], .ws_col = payload[2] << 8 | payload[3] };
			if (ws.ws_row && ws.ws_col && ioctl(p->tty_fd, TIOCSWINSZ, &ws) < 0)
				logmsg("resize %u: %s", id, strerror(errno));
		}
		break;
	case T_STDIN:
		do_stdin(p, payload, len);
		break;
	case T_SIGNAL:
		if (p && len == 4 && p->pid > 0 && !p->exited)
			kill(p->pid, (int)get_be32(payload)); /* the process only, like `docker kill` */
		break;
	case T_SHUTDOWN:
		begin_shutdown(len == 4 ? get_be32(payload) : 10);
		break;
	case T_EXIT_ACK:
		if (id == 1 && main_exit_sent)
			main_acked = 1;
		break;
	case T_REATTACH:
		do_reattach(payload, len);
		break;
	default:
		logmsg("protocol error: unknown frame type 0x%02x (ignored)", type);
	}
}

/* Parse every complete frame in rbuf. */
static void handle_input(void)
{
	size_t off = 0;
	while (rlen - off >= 8) {
		unsigned char *h = rbuf + off;
		uint32_t len = get_be32(h + 4);
		if (len > MAX_PAYLOAD) {
			logmsg("protocol error: frame payload of %u bytes (max %u)", len, MAX_PAYLOAD);
			if (socket_mode)
				finish();
			rlen = 0; /* device mode: we cannot resync, drop what we have */
			return;
		}
		if (rlen - off - 8 < len)
			break;
		dispatch(h[0], h[1], (uint16_t)(h[2] << 8 | h[3]), h + 8, len);
		off += 8 + len;
	}
	memmove(rbuf, rbuf + off, rlen - off);
	rlen -= off;
}

static void read_port(void)
{
	ssize_t n = read(port_fd, rbuf + rlen, sizeof rbuf - rlen);
	if (n > 0) {
		host_gone = 0;
		rlen += n;
		handle_input();
	} else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
		if (socket_mode) {
			logmsg("host closed the connection");
			finish(); /* nobody can ever collect output: kill everything, exit */
		}
		/* virtio-serial: EOF just means no host is attached right now. What a host that left
		 * sent half of is no frame; process 1's unacknowledged exit waits for the next host. */
		if (!host_gone && main_exit_sent && !main_acked)
			end_deadline = -1;
		host_gone = 1;
		rlen = 0;
		port_pause_until = uptime_ms() + HUP_BACKOFF_MS;
	}
}

/* Returns 0 at EOF or error (the fd is then closed), 1 if data or nothing was read. */
static int pump_output(struct proc *p, int *fd, int type)
{
	static char buf[OUT_CHUNK];
	ssize_t n = read(*fd, buf, sizeof buf);
	if (n > 0) {
		send_output(type, p->id, buf, n);
		return 1;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 1;
	close(*fd);
	*fd = -1;
	return 0;
}

static void read_exec_pipe(struct proc *p)
{
	struct exec_report r;
	ssize_t n = read(p->exec_fd, &r, sizeof r);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n > 0) {
		r.msg[sizeof r.msg - 1] = 0;
		send_text(T_ERROR, p->id, "%s", r.msg);
	} else {
		send_text(T_STARTED, p->id, "pid=%d uptime_ms=%lld", (int)p->pid, (long long)p->fork_ms);
	}
	close(p->exec_fd);
	p->exec_fd = -1;
}

/* Send EXIT once the process is dead, exec is resolved and its output drained (or 200 ms). */
static void maybe_finish_proc(struct proc *p, int64_t now)
{
	if (!p->exited || p->exec_fd >= 0)
		return;
	if (p->out_fd >= 0 || p->err_fd >= 0) {
		if (now < p->died_ms + DRAIN_MS)
			return;
		/* A grandchild holds the pipes: send what is readable now, then give up on them. */
		for (int i = 0; i < 16 && p->out_fd >= 0 && pump_output(p, &p->out_fd, T_STDOUT); i++)
			;
		for (int i = 0; i < 16 && p->err_fd >= 0 && pump_output(p, &p->err_fd, T_STDERR); i++)
			;
		if (p->out_fd >= 0)
			close(p->out_fd);
		if (p->err_fd >= 0)
			close(p->err_fd);
	}
	close_stdin(p);
	if (p->tty_fd >= 0)
		close(p->tty_fd);
	uint16_t id = p->id;
	int st = p->status;
	memset(p, 0, sizeof *p);
	if (WIFSIGNALED(st))
		send_exit(id, 1, WTERMSIG(st));
	else
		send_exit(id, 0, WEXITSTATUS(st));
}

static void on_sigchld(int sig)
{
	(void)sig;
	int saved = errno;
	if (write(sig_pipe[1], "", 1) < 0) { /* pipe full: a wakeup is already pending */ }
	errno = saved;
}

static int find_port(const char *name, char *dev, size_t devlen)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	char path[512], buf[256];
	int found = 0;
	while (d && !found && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
		FILE *f = fopen(path, "re");
		if (!f)
			continue;
		if (fgets(buf, sizeof buf, f) && (buf[strcspn(buf, "\n")] = 0, !strcmp(buf, name))) {
			snprintf(dev, devlen, "/dev/%s", e->d_name);
			found = 1;
			/* The initramfs may have no devtmpfs on /dev: make the node from sysfs. */
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/dev", e->d_name);
			FILE *df = fopen(path, "re");
			unsigned maj, min;
			if (access(dev, F_OK) < 0 && df && fscanf(df, "%u:%u", &maj, &min) == 2) {
				mkdir("/dev", 0755);
				mknod(dev, S_IFCHR | 0600, makedev(maj, min));
			}
			if (df)
				fclose(df);
		}
		fclose(f);
	}
	if (d)
		closedir(d);
	return found;
}

static int open_port(const char *port_path, const char *port_name)
{
	if (port_path) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		snprintf(sa.sun_path, sizeof sa.sun_path, "%s", port_path);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
			return -1;
		return fd;
	}
	char dev[300];
	for (int i = 0; i < 50; i++) { /* the port can appear after we start: wait ~5 s */
		if (find_port(port_name, dev, sizeof dev))
			return open(dev, O_RDWR | O_CLOEXEC);
		usleep(100000);
	}
	errno = ENODEV;
	return -1;
}

/* ---------- --init: the agent as the initramfs's /init (kvmc's own kernel) ---------- */

#define ROOT_SERIAL "kvmc-root"   /* kvmc/domain.py ROOT_SERIAL: the container's root disk */
#define INIT_ROOT "/newroot"
#define INIT_PORT "org.kvmc.agent"

/* Ends the VM from init before the agent loop runs (no disk, a probe boot). */
static _Noreturn void init_end(void)
{
	sync();
	reboot(exit_by_reboot ? RB_AUTOBOOT : RB_POWER_OFF);
	for (;;)
		pause();
}

static void init_mount(const char *src, const char *target, const char *type, unsigned long flags,
		       const char *data)
{
	mkdir(target, 0755);
	if (mount(src, target, type, flags, data) < 0)
		logmsg("init: mount %s on %s: %s", type, target, strerror(errno));
}

/* Whether the kernel command line has WORD (a whole, space-separated word). */
static int cmdline_has(const char *cmdline, const char *word)
{
	size_t n = strlen(word);
	for (const char *p = cmdline; (p = strstr(p, word)); p += n)
		if ((p == cmdline || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n' || !p[n]))
			return 1;
	return 0;
}

/*
 * What images/initramfs/init did with busybox, in C: measured under TCG, the shell init (exec of
 * busybox, its applet symlinks, two greps, a mount per fork) cost ~125 ms of every boot and
 * busybox itself 2 MB of initramfs to unpack. Mount /proc, /sys, /dev; read how this VM ends
 * (kvmc.exit=reboot) and whether it is the accel probe (kvmc.probe) from the command line; find
 * the root disk by its serial (virtio-mmio probe order need not follow the domain XML), mount it
 * on /newroot with what docker gives every container (proc, sys, dev, pts, shm); bring up lo.
 * Debian's kernel still starts from the busybox script (it must insmod its virtio modules
 * first), which then execs `kvmc-agent --init`.
 */
static void init_guest(void)
{
	int64_t init_start_ms = uptime_ms();
	init_mount("proc", "/proc", "proc", 0, NULL);
	init_mount("sysfs", "/sys", "sysfs", 0, NULL);
	init_mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	/* The kernel found no /dev/console in the initramfs: give stdio the console now. */
	if (fcntl(1, F_GETFD) < 0 || fcntl(2, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR);
		for (int i = 0; fd >= 0 && i <= 2; i++)
			if (fcntl(i, F_GETFD) < 0)
				dup2(fd, i);
		if (fd > 2)
			close(fd);
	}
	char cmdline[4096] = "";
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
		cmdline[n > 0 ? n : 0] = 0;
		close(fd);
	}
	if (cmdline_has(cmdline, "kvmc.exit=reboot"))
		exit_by_reboot = 1;
	/* kvmc.debug: the agent's own boot timestamps on the console (bench/boot_profile.py). */
	boot_debug = cmdline_has(cmdline, "kvmc.debug");
	if (boot_debug)
		logmsg("init: started at %lld ms uptime", (long long)init_start_ms);
	if (cmdline_has(cmdline, "kvmc.probe")) { /* kvmc/accel.py: this kernel reaches user space */
		printf("KVMC-PROBE-OK\n");
		fflush(stdout);
		init_end();
	}
	char dev[64];
	if (!find_disk(ROOT_SERIAL, dev, sizeof dev, 250)) {
		logmsg("init: no root disk (virtio-blk serial %s)", ROOT_SERIAL);
		init_end();
	}
	mkdir(INIT_ROOT, 0755);
	if (mount(dev, INIT_ROOT, "ext4", MS_NOATIME, NULL) < 0) {
		logmsg("init: cannot mount rootfs %s: %s", dev, strerror(errno));
		init_end();
	}
	init_mount("proc", INIT_ROOT "/proc", "proc", 0, NULL);
	init_mount("sysfs", INIT_ROOT "/sys", "sysfs", 0, NULL);
	init_mount("devtmpfs", INIT_ROOT "/dev", "devtmpfs", 0, NULL);
	init_mount("devpts", INIT_ROOT "/dev/pts", "devpts", 0, "newinstance,ptmxmode=0666");
	init_mount("shm", INIT_ROOT "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	struct ifreq ifr = { .ifr_name = "lo" };
	int sk = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sk < 0 || ioctl(sk, SIOCGIFFLAGS, &ifr) < 0 ||
	    (ifr.ifr_flags |= IFF_UP | IFF_RUNNING, ioctl(sk, SIOCSIFFLAGS, &ifr) < 0))
		logmsg("init: lo up: %s", strerror(errno));
	if (sk >= 0)
		close(sk);
	if (boot_debug)
		logmsg("init: root mounted, lo up at %lld ms uptime", (long long)uptime_ms());
}

int main(int argc, char **argv)
{
	const char *port_path = NULL, *port_name = NULL;
	/* The kernel starts /init (this binary, in kvmc's initramfs) as PID 1 with no arguments. */
	int init = getpid() == 1 && argc == 1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--init")) init = 1;
		else if (!strcmp(argv[i], "--root") && i + 1 < argc) root = argv[++i];
		else if (!strcmp(argv[i], "--port") && i + 1 < argc) port_path = argv[++i];
		else if (!strcmp(argv[i], "--port-name") && i + 1 < argc) port_name = argv[++i];
		else if (!strcmp(argv[i], "--no-poweroff")) no_poweroff = 1;
		else if (!strcmp(argv[i], "--exit-by-reboot")) exit_by_reboot = 1;
		else if (!strcmp(argv[i], "--version")) {
			/* Also what a hot pool member runs once, as /proc/self/exe, to warm it up. */
			printf("kvmc-agent/%d\n", PROTOCOL);
			return 0;
		} else {
			fprintf(stderr, "usage: kvmc-agent --root DIR (--port-name NAME | --port SOCKET) "
					"[--no-poweroff] [--exit-by-reboot] | --init [--exit-by-reboot] | --version\n");
			return 2;
		}
	}
	if (init) {
		if (getpid() != 1) {
			fprintf(stderr, "kvmc-agent: --init only as PID 1 of the guest\n");
			return 2;
		}
		init_guest();
		root = INIT_ROOT;
		port_name = INIT_PORT;
	}
	if (!port_path == !port_name) {
		fprintf(stderr, "kvmc-agent: give exactly one of --port-name and --port\n");
		return 2;
	}
	is_pid1 = getpid() == 1;
	socket_mode = port_path != NULL;
	/* Without a console, fds 0-2 may be closed; keep our pipes from landing on them. */
	for (int fd = 0; fd <= 2;)
		if ((fd = open("/dev/null", O_RDWR)) > 2 || fd < 0) {
			if (fd > 2)
				close(fd);
			break;
		}
	if (!is_pid1)
		prctl(PR_SET_CHILD_SUBREAPER, 1); /* tests: orphans come back to us, as with PID 1 */
	signal(SIGPIPE, SIG_IGN);
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		return 1;
	struct sigaction sa = { .sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP };
	sigaction(SIGCHLD, &sa, NULL);

	if ((port_fd = open_port(port_path, port_name)) < 0) {
		logmsg("cannot open port %s: %s", port_path ? port_path : port_name, strerror(errno));
		if (is_pid1 && !no_poweroff)
			finish();
		return 1;
	}
	set_nonblock(port_fd); /* frames are queued (flush_out): never block on an absent host */
	send_text(T_READY, 0, "kvmc-agent/%d uptime_ms=%lld", PROTOCOL, (long long)uptime_ms());

	for (;;) {
		struct pollfd pf[2 + MAX_PROCS * 4];
		struct { struct proc *p; int which; } who[2 + MAX_PROCS * 4];
		int n = 0;
		int64_t now = uptime_ms(), wake = -1;
#define WAKE_AT(t) (wake = (wake < 0 || (t) < wake) ? (t) : wake)
#define WATCH(fd_, ev, p_, w) (pf[n] = (struct pollfd){ fd_, ev, 0 }, who[n].p = p_, who[n++].which = w)

		if (main_exit_sent && (main_acked || (end_deadline >= 0 && now >= end_deadline)))
			finish();
		if (shutdown_requested) {
			int live = 0;
			for (int i = 0; i < MAX_PROCS; i++)
				live += procs[i].used;
			if (!live && (!main_started || main_acked))
				finish();
			if (!live && end_deadline < 0 && !(host_gone && main_exit_sent))
				end_deadline = now + ACK_MS;
			if (!live && end_deadline >= 0 && now >= end_deadline)
				finish();
			if (live && !shutdown_killed && now >= shutdown_deadline) {
				shutdown_killed = 1;
				kill_all(SIGKILL);
			}
			WAKE_AT(live ? (shutdown_killed ? now + 100 : shutdown_deadline) : end_deadline);
		}
		if (end_deadline >= 0)
			WAKE_AT(end_deadline);

		WATCH(sig_pipe[0], POLLIN, NULL, 0);
		if (now >= port_pause_until) {
			short events = (stdin_queued < STDIN_HIGH ? POLLIN : 0) | (outq_head && !host_gone ? POLLOUT : 0);
			if (events)
				WATCH(port_fd, events, NULL, 1);
		} else {
			WAKE_AT(port_pause_until);
		}
		/* Output waits while the host is slow; without a host it is read and dropped. */
		int take_output = host_gone || outq_bytes < OUT_LIMIT;
		for (int i = 0; i < MAX_PROCS; i++) {
			struct proc *p = &procs[i];
			if (!p->used)
				continue;
			if (p->exec_fd >= 0) WATCH(p->exec_fd, POLLIN, p, 0);
			if (p->out_fd >= 0 && take_output) WATCH(p->out_fd, POLLIN, p, 1);
			if (p->err_fd >= 0 && take_output) WATCH(p->err_fd, POLLIN, p, 2);
			if (p->in_fd >= 0 && p->in_len) WATCH(p->in_fd, POLLOUT, p, 3);
			if (p->exited)
				WAKE_AT(p->died_ms + DRAIN_MS);
		}
		int timeout = wake < 0 ? -1 : wake <= now ? 0 : (int)(wake - now);
		if (poll(pf, n, timeout) < 0 && errno != EINTR) {
			logmsg("poll: %s", strerror(errno));
			sleep(1);
			continue;
		}
		for (int i = 0; i < n; i++) {
			struct proc *p = who[i].p;
			if (!pf[i].revents)
				continue;
			if (!p && who[i].which == 0) {
				char drain[64];
				while (read(sig_pipe[0], drain, sizeof drain) > 0)
					;
				reap();
			} else if (!p) {
				if (pf[i].revents & POLLOUT)
					flush_out();
				if (pf[i].revents & (POLLIN | POLLERR) ||
				    (pf[i].revents & POLLHUP && pf[i].events & POLLIN))
					read_port(); /* POLLHUP alone: read() sees the EOF and backs off */
				else if (pf[i].revents & POLLHUP) { /* stdin is full: no read, but no host either */
					host_gone = 1;
					port_pause_until = uptime_ms() + HUP_BACKOFF_MS;
				}
			} else if (!p->used) {
				continue; /* finished earlier in this round */
			} else if (who[i].which == 0) {
				read_exec_pipe(p);
			} else if (who[i].which == 1 && p->out_fd >= 0) {
				pump_output(p, &p->out_fd, T_STDOUT);
			} else if (who[i].which == 2 && p->err_fd >= 0) {
				pump_output(p, &p->err_fd, T_STDERR);
			} else if (who[i].which == 3 && p->in_fd >= 0) {
				flush_stdin(p);
			}
		}
		reap(); /* cheap, and covers a SIGCHLD that raced the pipe */
		now = uptime_ms();
		for (int i = 0; i < MAX_PROCS; i++)
			if (procs[i].used)
				maybe_finish_proc(&procs[i], now);
	}
}
