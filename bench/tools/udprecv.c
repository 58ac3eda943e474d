/* udprecv: counts UDP datagrams received on many ports, per group.
 *
 * Ports come from a file (-P), one a line: GROUP PORT (GROUP 0..15), or the
 * same lines as udpsend's stream file (GROUP DST_IP SPORT DPORT: the last
 * number is the port). One UDP socket is bound per port on ADDRESS (so
 * nothing is answered with ICMP port unreachable).
 *
 * Default: busy polling (recvmmsg with MSG_DONTWAIT on every socket in
 * turn). Nobody then sleeps on the sockets, so the CPU that delivers the
 * packets (on veth: the sender's) pays no wakeups; this process uses its
 * own CPU fully. -E: epoll instead (sleeps; every delivery may wake it).
 *
 * Runs for -t seconds or until SIGINT/SIGTERM; -R FILE gets "READY" once
 * every socket is bound. Prints one JSON object:
 *   {"received": N, "seconds": S, "interval": I,
 *    "groups": [{"group": G, "ports": N, "received": N, "bytes": N}, ...],
 *    "counts": [packets per interval, all groups]}
 *
 * udprecv -a ADDRESS -P FILE [-t SECONDS] [-i INTERVAL] [-R FILE] [-E]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "packet_tools.h"

#define MAX_PORTS 65536
#define MAX_GROUPS 16
#define VLEN 64
#define MAX_INTERVALS 100000

static void usage(void) {
    fprintf(stderr, "usage: udprecv -a ADDRESS -P FILE [-t SECONDS] [-i INTERVAL] [-R FILE] [-E]\n"
                    "FILE: lines GROUP PORT (or GROUP DST_IP SPORT DPORT)\n");
    exit(2);
}

static unsigned long long group_received[MAX_GROUPS], group_bytes[MAX_GROUPS];
static int group_ports[MAX_GROUPS];
static struct mmsghdr msgs[VLEN];
static unsigned long long *counts;
static int slots;
static double start, interval;

/* Drain one socket; returns the number of packets read. */
static int drain(int fd, int group) {
    int got = 0;
    for (;;) {
        int r = recvmmsg(fd, msgs, VLEN, MSG_DONTWAIT, NULL);
        if (r <= 0) break;
        int slot = (int)((now() - start) / interval);
        if (slot >= slots) slot = slots - 1;
        counts[slot] += r;
        group_received[group] += r;
        for (int k = 0; k < r; k++) group_bytes[group] += msgs[k].msg_len;
        got += r;
        if (r < VLEN) break;
    }
    return got;
}

int main(int argc, char **argv) {
    const char *address = NULL, *file = NULL, *ready = NULL;
    int use_epoll = 0;
    double duration = 10.0;
    interval = 0.25;
    int opt;
    while ((opt = getopt(argc, argv, "a:P:t:i:R:E")) != -1) {
        switch (opt) {
        case 'a': address = optarg; break;
        case 'P': file = optarg; break;
        case 't': duration = atof(optarg); break;
        case 'i': interval = atof(optarg); break;
        case 'R': ready = optarg; break;
        case 'E': use_epoll = 1; break;
        default: usage();
        }
    }
    if (!address || !file || duration <= 0 || interval <= 0) usage();
    static int ports[MAX_PORTS], groups[MAX_PORTS];
    int n = 0;
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); return 1; }
    char line[256];
    while (n < MAX_PORTS && fgets(line, sizeof line, f)) {
        char *first = NULL, *last = NULL, *tok = strtok(line, " \t\r\n");
        while (tok) {
            if (!first) first = tok;
            last = tok;
            tok = strtok(NULL, " \t\r\n");
        }
        if (!first || first == last) continue;
        groups[n] = atoi(first);
        ports[n] = atoi(last);
        if (groups[n] < 0 || groups[n] >= MAX_GROUPS || ports[n] <= 0 || ports[n] >= 65536) {
            fprintf(stderr, "udprecv: bad line %d\n", n + 1);
            return 2;
        }
        n++;
    }
    fclose(f);
    if (n < 1) { fprintf(stderr, "udprecv: no ports in %s\n", file); return 2; }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int ep = epoll_create1(0);
    int *fds = calloc(n, sizeof(int));
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0) { perror("socket"); return 1; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        int rcvbuf = n > 64 ? 512 << 10 : 8 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(ports[i])};
        if (inet_pton(AF_INET, address, &a.sin_addr) != 1) usage();
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            fprintf(stderr, "udprecv: bind %s:%d: %s\n", address, ports[i], strerror(errno));
            return 1;
        }
        fds[i] = fd;
        group_ports[groups[i]]++;
        if (use_epoll) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)groups[i] << 32) | (uint32_t)fd};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    if (ready) {
        FILE *r = fopen(ready, "w");
        if (r) { fputs("READY\n", r); fclose(r); }
    }

    static char bufs[VLEN][2048];
    static struct iovec iov[VLEN];
    for (int i = 0; i < VLEN; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    slots = (int)(duration / interval) + 1;
    if (slots > MAX_INTERVALS) slots = MAX_INTERVALS;
    counts = calloc(slots, sizeof *counts);
    struct epoll_event events[256];
    start = now();
    double end = start + duration;
    while (!stop) {
        double t = now();
        if (t >= end) break;
        if (use_epoll) {
            int ms = (int)((end - t) * 1000) + 1;
            if (ms > 50) ms = 50;
            int nready = epoll_wait(ep, events, 256, ms);
            if (nready < 0) {
                if (errno == EINTR) continue;
                perror("epoll_wait");
                break;
            }
            for (int e = 0; e < nready; e++)
                drain((int)(uint32_t)events[e].data.u64, (int)(events[e].data.u64 >> 32));
        } else {
            for (int i = 0; i < n; i++) drain(fds[i], groups[i]);
        }
    }
    double elapsed = now() - start;
    unsigned long long total = 0;
    for (int g = 0; g < MAX_GROUPS; g++) total += group_received[g];
    int used = (int)(elapsed / interval) + 1;
    if (used > slots) used = slots;
    printf("{\"received\": %llu, \"seconds\": %.4f, \"interval\": %g, \"groups\": [", total, elapsed, interval);
    int first = 1;
    for (int g = 0; g < MAX_GROUPS; g++) {
        if (!group_ports[g]) continue;
        printf("%s{\"group\": %d, \"ports\": %d, \"received\": %llu, \"bytes\": %llu}", first ? "" : ", ", g,
               group_ports[g], group_received[g], group_bytes[g]);
        first = 0;
    }
    printf("], \"counts\": [");
    for (int i = 0; i < used; i++) printf(i ? ", %llu" : "%llu", counts[i]);
    printf("]}\n");
    return 0;
}
