/*
 * tcpbench: the guest side of bench/network.py (busybox has no timing TCP client).
 *
 *   tcpbench serve PORT          accept for ever; per connection, the first byte picks:
 *                                'R' echo every byte back (round trips), 'T' read to EOF,
 *                                then answer the byte count as 8 bytes (throughput)
 *   tcpbench rtt HOST PORT N     N one-byte round trips on one connection: prints the mean in
 *                                microseconds (the whole loop timed once: a guest's clock may
 *                                tick in milliseconds, too coarse for one round trip)
 *   tcpbench tput HOST PORT MIB  send MIB MiB, wait for the count: prints MiB/s
 *
 * HOST is an IPv4 address or a name (getaddrinfo). Static build: gcc -O2 -static.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int full_write(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n <= 0)
			return -1;
		p += n, len -= n;
	}
	return 0;
}

static int full_read(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n <= 0)
			return -1;
		p += n, len -= n;
	}
	return 0;
}

static void nodelay(int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void serve_one(int c)
{
	char mode, buf[65536];
	nodelay(c);
	if (read(c, &mode, 1) != 1)
		return;
	if (mode == 'R') {
		char b;
		while (read(c, &b, 1) == 1 && write(c, &b, 1) == 1)
			;
	} else if (mode == 'T') {
		uint64_t total = 0;
		ssize_t n;
		while ((n = read(c, buf, sizeof buf)) > 0)
			total += n;
		full_write(c, &total, sizeof total);
	}
}

static int serve(int port)
{
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) {
		perror("tcpbench: listen");
		return 1;
	}
	signal(SIGCHLD, SIG_IGN);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		if (fork() == 0) {
			close(s);
			serve_one(c);
			_exit(0);
		}
		close(c);
	}
}

static int dial(const char *host, const char *port)
{
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *res;
	int err = getaddrinfo(host, port, &hints, &res);
	if (err) {
		fprintf(stderr, "tcpbench: %s: %s\n", host, gai_strerror(err));
		exit(1);
	}
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) {
		perror("tcpbench: connect");
		exit(1);
	}
	freeaddrinfo(res);
	nodelay(fd);
	return fd;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]));
	if (argc == 5 && !strcmp(argv[1], "rtt")) {
		int fd = dial(argv[2], argv[3]), n = atoi(argv[4]);
		char b = 'R';
		full_write(fd, &b, 1);
		double t0 = now_us();
		for (int i = 0; i < n; i++)
			if (full_write(fd, &b, 1) < 0 || full_read(fd, &b, 1) < 0) {
				fprintf(stderr, "tcpbench: connection lost\n");
				return 1;
			}
		printf("rtt_mean_us=%.1f n=%d\n", (now_us() - t0) / n, n);
		return 0;
	}
	if (argc == 5 && !strcmp(argv[1], "tput")) {
		int fd = dial(argv[2], argv[3]);
		long mib = atol(argv[4]);
		static char buf[65536];
		uint64_t got = 0;
		memset(buf, 'x', sizeof buf);
		double t0 = now_us();
		full_write(fd, "T", 1);
		for (long i = 0; i < mib * 16; i++)
			if (full_write(fd, buf, sizeof buf) < 0) {
				fprintf(stderr, "tcpbench: connection lost\n");
				return 1;
			}
		shutdown(fd, SHUT_WR);
		if (full_read(fd, &got, sizeof got) < 0 || got != (uint64_t)mib << 20) {
			fprintf(stderr, "tcpbench: the server counted %llu bytes\n", (unsigned long long)got);
			return 1;
		}
		printf("tput_mib_s=%.2f mib=%ld\n", mib / ((now_us() - t0) / 1e6), mib);
		return 0;
	}
	fprintf(stderr, "usage: tcpbench serve PORT | rtt HOST PORT N | tput HOST PORT MIB\n");
	return 2;
}
