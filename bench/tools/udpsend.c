/* udpsend: UDP load generator for the MediaProxy benchmarks.
 *
 * Streams come from a file (-P), one a line:  GROUP DST_IP SPORT DPORT
 * (GROUP a small number, 0..15). Every stream sends fixed-size datagrams
 * (RTP-looking, 172 bytes by default like G.711 at 20 ms) from SRC_IP:SPORT
 * to DST_IP:DPORT.
 *
 * Groups are sent in turn, SLICE ms each (-S, default 10; A B C A B C ...), so that the
 * scenarios they stand for are measured under the same machine conditions
 * even when the CPU speed drifts (it does, by 2x, on shared VMs). Within a
 * slice the streams of the group are sent round-robin. With one group it
 * simply blasts. At the end one JSON object goes to stdout:
 *   {"mode": M, "seconds": S, "cpu_seconds": C, "groups": [{"group": G, "streams": N,
 *     "sent": N, "errors": N, "seconds": S}, ...]}
 * ("seconds" of a group: the time spent sending its slices; "cpu_seconds":
 * this process's user + system time while sending, which with tick-based
 * accounting includes the softirq work done in its context), and
 *   "slices": [[GROUP, SENT, SECONDS], ...] every slice in order, so that
 * adjacent slices of different groups can be compared (a slice where other
 * work took the CPU is then one outlier, not a bias).
 *
 * Two ways to send (-m):
 *   udp     one connected UDP socket per stream, bound to SRC_IP:SPORT;
 *           sendmmsg of BATCH packets on one socket per turn: a phone's
 *           stack, including the sender's own UDP/IP output path;
 *   packet  one AF_PACKET socket on interface -i; Ethernet frames built here
 *           (IPv4 and UDP checksums computed, so NAT has to fix them up) to
 *           the next hop's MAC -M from the MAC of -i; sendmmsg of BATCH
 *           frames that cycle through the group's streams packet by packet.
 *           Skips the sender's own IP stack, so more of the CPU goes to the
 *           forwarding being measured. Needs CAP_NET_RAW.
 * Both use MSG_DONTWAIT; a refused packet (ENOBUFS, EAGAIN) counts as an error.
 *
 * udpsend -a SRC_IP -P FILE [-l SIZE] [-t SECONDS] [-r PPS] [-b BATCH]
 *         [-S SLICE_MS] [-m udp|packet -i IFACE -M NEXT_HOP_MAC]
 * -r PPS: total rate (paced); without it, as fast as possible.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "packet_tools.h"

#define MAX_BATCH 256
#define MAX_STREAMS 65536
#define MAX_GROUPS 16
#define MAX_SLICES 200000

struct slice_record {
    int group;
    unsigned long long sent;
    double seconds;
};
static struct slice_record slices[MAX_SLICES];
static int nslices;

static void usage(void) {
    fprintf(stderr, "usage: udpsend -a SRC_IP -P FILE [-l SIZE] [-t SECONDS] [-r PPS] [-b BATCH] [-S SLICE_MS]\n"
                    "               [-m udp|packet -i IFACE -M NEXT_HOP_MAC]\n"
                    "FILE: lines GROUP DST_IP SPORT DPORT\n");
    exit(2);
}


struct group {
    int id, first, count, next; /* streams [first, first+count) after sorting */
    unsigned long long sent, errors;
    double seconds;
};

struct stream {
    int group, sport, dport;
    struct in_addr dst;
};

static int by_group(const void *a, const void *b) {
    const struct stream *x = a, *y = b;
    return x->group - y->group;
}

int main(int argc, char **argv) {
    const char *src = NULL, *file = NULL, *mode = "udp", *ifname = NULL, *mac = NULL;
    int size = 172, batch = 32;
    double duration = 5.0, rate = 0.0, slice = 0.01;
    int opt;
    while ((opt = getopt(argc, argv, "a:P:l:t:r:b:S:m:i:M:")) != -1) {
        switch (opt) {
        case 'a': src = optarg; break;
        case 'P': file = optarg; break;
        case 'l': size = atoi(optarg); break;
        case 't': duration = atof(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'S': slice = atof(optarg) / 1000.0; break;
        case 'm': mode = optarg; break;
        case 'i': ifname = optarg; break;
        case 'M': mac = optarg; break;
        default: usage();
        }
    }
    int packet_mode = strcmp(mode, "packet") == 0;
    if (!src || !file || size < 12 || size > 1400 || batch < 1 || batch > MAX_BATCH || duration <= 0 || slice <= 0)
        usage();
    if (!packet_mode && strcmp(mode, "udp") != 0) usage();
    if (packet_mode && (!ifname || !mac)) usage();

    static struct stream streams[MAX_STREAMS];
    int n = 0;
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); return 1; }
    char dst_text[64];
    while (n < MAX_STREAMS &&
           fscanf(f, "%d %63s %d %d", &streams[n].group, dst_text, &streams[n].sport, &streams[n].dport) == 4) {
        if (streams[n].group < 0 || streams[n].group >= MAX_GROUPS ||
            inet_pton(AF_INET, dst_text, &streams[n].dst) != 1) {
            fprintf(stderr, "udpsend: bad stream line %d\n", n + 1);
            return 2;
        }
        n++;
    }
    fclose(f);
    if (n < 1) { fprintf(stderr, "udpsend: no streams in %s\n", file); return 2; }
    qsort(streams, n, sizeof streams[0], by_group);
    struct group groups[MAX_GROUPS];
    int ngroups = 0;
    for (int i = 0; i < n; i++) {
        if (ngroups == 0 || groups[ngroups - 1].id != streams[i].group) {
            memset(&groups[ngroups], 0, sizeof groups[0]);
            groups[ngroups].id = streams[i].group;
            groups[ngroups].first = i;
            ngroups++;
        }
        groups[ngroups - 1].count++;
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    /* An RTP-looking payload (version 2, PT 0): nothing on the path takes
     * it for STUN. */
    char *payload = calloc(1, size);
    memset(payload, 0xd5, size);
    payload[0] = (char)0x80;
    payload[1] = 0;

    struct in_addr src_addr;
    if (inet_pton(AF_INET, src, &src_addr) != 1) usage();
    int *fds = calloc(n, sizeof(int));
    int pfd = -1, frame_len = 14 + 20 + 8 + size;
    uint8_t *frames = NULL;
    if (packet_mode) {
        uint8_t smac[6], dmac[6];
        pfd = open_packet_socket(ifname, mac, smac, dmac);
        if (pfd < 0) return 1;
        frames = calloc(n, frame_len);
        for (int i = 0; i < n; i++)
            build_frame(frames + (size_t)i * frame_len, dmac, smac, src_addr, streams[i].dst, streams[i].sport,
                        streams[i].dport, payload, size, i);
    } else {
        for (int i = 0; i < n; i++) {
            int fd = socket(AF_INET, SOCK_DGRAM, 0);
            if (fd < 0) { perror("socket"); return 1; }
            int one = 1;
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            int sndbuf = n > 64 ? 256 << 10 : 4 << 20;
            setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(streams[i].sport), .sin_addr = src_addr};
            if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
                fprintf(stderr, "udpsend: bind %s:%d: %s\n", src, streams[i].sport, strerror(errno));
                return 1;
            }
            struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(streams[i].dport), .sin_addr = streams[i].dst};
            if (connect(fd, (struct sockaddr *)&d, sizeof d) < 0) { perror("connect"); return 1; }
            fds[i] = fd;
        }
    }

    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < batch; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    unsigned long long total = 0;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu0 = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
    double start = now(), end = start + duration, t = start;
    int g = 0;
    double slice_start = start, slice_end = ngroups > 1 ? start + slice : end;
    unsigned long long slice_sent0 = 0;
    while (!stop) {
        { /* a clock read per batch: cheap (vDSO), and slices stay exact */
            t = now();
            if (t >= end) break;
            if (t >= slice_end) {
                groups[g].seconds += t - slice_start;
                if (nslices < MAX_SLICES) {
                    slices[nslices].group = groups[g].id;
                    slices[nslices].sent = groups[g].sent - slice_sent0;
                    slices[nslices].seconds = t - slice_start;
                    nslices++;
                }
                g = (g + 1) % ngroups;
                slice_start = t;
                slice_sent0 = groups[g].sent;
                slice_end = t + slice < end ? t + slice : end;
            }
        }
        if (rate > 0) {
            double due = start + total / rate;
            if (due > t) {
                double wait = due - t;
                if (wait > 0.0002) {
                    struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
                    nanosleep(&ts, NULL);
                }
                continue;
            }
        }
        struct group *gr = &groups[g];
        int r;
        if (packet_mode) {
            for (int i = 0; i < batch; i++) {
                iov[i].iov_base = frames + (size_t)(gr->first + gr->next) * frame_len;
                iov[i].iov_len = frame_len;
                if (++gr->next == gr->count) gr->next = 0;
            }
            r = sendmmsg(pfd, msgs, batch, MSG_DONTWAIT);
        } else {
            r = sendmmsg(fds[gr->first + gr->next], msgs, batch, MSG_DONTWAIT);
            if (++gr->next == gr->count) gr->next = 0;
        }
        if (r > 0) {
            gr->sent += r;
            total += r;
            if (r < batch) gr->errors += batch - r;
        } else {
            gr->errors += batch; /* ENOBUFS/EAGAIN: the path is saturated */
            total += batch;      /* pacing counts attempts */
        }
    }
    double stop_time = now();
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6 - cpu0;
    groups[g].seconds += stop_time - slice_start;
    printf("{\"mode\": \"%s\", \"seconds\": %.4f, \"cpu_seconds\": %.4f, \"groups\": [", mode, stop_time - start, cpu);
    for (int i = 0; i < ngroups; i++)
        printf("%s{\"group\": %d, \"streams\": %d, \"sent\": %llu, \"errors\": %llu, \"seconds\": %.4f}", i ? ", " : "",
               groups[i].id, groups[i].count, groups[i].sent, groups[i].errors, groups[i].seconds);
    printf("], \"slices\": [");
    for (int i = 0; i < nslices; i++)
        printf("%s[%d, %llu, %.6f]", i ? ", " : "", slices[i].group, slices[i].sent, slices[i].seconds);
    printf("]}\n");
    return 0;
}
