/* scalesend: many parties' RTP/RTCP from one AF_PACKET socket (bench/scale.py).
 *
 * The scale benchmark needs packets from tens of thousands of source ports
 * (10,000 calls: 20,000 RTP/RTCP ports per side) without a socket per port:
 * the descriptors of this machine (20,000 at most) are the very thing the
 * relay must be shown to save. Frames are built here (Ethernet, IPv4, UDP
 * with checksums) and sent on one AF_PACKET socket to the next hop's MAC.
 *
 * Streams come from a file (-P), one a line:  SPORT DST_IP DPORT
 * (all from SRC_IP, -a). Two modes:
 *   burst      (default) every stream once per round, ROUNDS rounds (-n) GAP
 *              ms apart (-g), paced at -r packets/s: latching a wave of calls,
 *              or the last packets of streams that are to expire together;
 *   keepalive  (-t SECONDS -p PERIOD) every stream once per PERIOD seconds,
 *              spread evenly over the period (a tick of 10 ms), until
 *              SECONDS are over or SIGTERM/SIGINT.
 * Payload: RTP-looking (version 2, PT 0; never STUN), -l bytes (default 60).
 * At the end one JSON line: {"streams": N, "sent": N, "errors": N, "seconds": S}.
 *
 * scalesend -i IFACE -M NEXT_HOP_MAC -a SRC_IP -P FILE [-l SIZE] [-r PPS]
 *           [-n ROUNDS -g GAP_MS | -t SECONDS -p PERIOD]
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "packet_tools.h"

#define MAX_STREAMS 200000
#define BATCH 64

static void sleep_until(double t) {
    double wait = t - now();
    if (wait <= 0) return;
    struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
    nanosleep(&ts, NULL);
}

static void usage(void) {
    fprintf(stderr, "usage: scalesend -i IFACE -M NEXT_HOP_MAC -a SRC_IP -P FILE [-l SIZE] [-r PPS]\n"
                    "                 [-n ROUNDS -g GAP_MS | -t SECONDS -p PERIOD]\n"
                    "FILE: lines SPORT DST_IP DPORT\n");
    exit(2);
}


static int fd;
static uint8_t *frames;
static int frame_len;
static unsigned long long sent, errors;

/* Send frames [first, first+count) (indices modulo n), BATCH at a time. */
static void send_range(long first, long count, int n) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    while (count > 0 && !stop) {
        int k = count < BATCH ? (int)count : BATCH;
        for (int i = 0; i < k; i++) {
            iov[i].iov_base = frames + (size_t)((first + i) % n) * frame_len;
            iov[i].iov_len = frame_len;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int r = sendmmsg(fd, msgs, k, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            errors += k;
            r = k;
        } else {
            sent += r;
            if (r == 0) { errors += k; r = k; }
        }
        first += r;
        count -= r;
    }
}

int main(int argc, char **argv) {
    const char *src = NULL, *file = NULL, *ifname = NULL, *mac = NULL;
    int size = 60, rounds = 1;
    double gap = 0.2, duration = 0, period = 5, rate = 50000;
    int opt;
    while ((opt = getopt(argc, argv, "i:M:a:P:l:r:n:g:t:p:")) != -1) {
        switch (opt) {
        case 'i': ifname = optarg; break;
        case 'M': mac = optarg; break;
        case 'a': src = optarg; break;
        case 'P': file = optarg; break;
        case 'l': size = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'n': rounds = atoi(optarg); break;
        case 'g': gap = atof(optarg) / 1000.0; break;
        case 't': duration = atof(optarg); break;
        case 'p': period = atof(optarg); break;
        default: usage();
        }
    }
    if (!src || !file || !ifname || !mac || size < 12 || size > 1400 || rounds < 1 || rate <= 0 || period <= 0)
        usage();

    static int sports[MAX_STREAMS], dports[MAX_STREAMS];
    static struct in_addr dsts[MAX_STREAMS];
    int n = 0;
    FILE *f = fopen(file, "r");
    if (!f) { perror(file); return 1; }
    char dst_text[64];
    while (n < MAX_STREAMS && fscanf(f, "%d %63s %d", &sports[n], dst_text, &dports[n]) == 3) {
        if (inet_pton(AF_INET, dst_text, &dsts[n]) != 1) {
            fprintf(stderr, "scalesend: bad stream line %d\n", n + 1);
            return 2;
        }
        n++;
    }
    fclose(f);
    if (n < 1) { fprintf(stderr, "scalesend: no streams in %s\n", file); return 2; }

    struct in_addr src_addr;
    if (inet_pton(AF_INET, src, &src_addr) != 1) usage();
    uint8_t smac[6], dmac[6];
    fd = open_packet_socket(ifname, mac, smac, dmac);
    if (fd < 0) return 1;

    uint8_t *payload = calloc(1, size);
    memset(payload, 0xd5, size);
    payload[0] = 0x80;
    payload[1] = 0;
    frame_len = 14 + 20 + 8 + size;
    frames = calloc(n, frame_len);
    if (!frames) { perror("calloc"); return 1; }
    for (int i = 0; i < n; i++)
        build_frame(frames + (size_t)i * frame_len, dmac, smac, src_addr, dsts[i], sports[i], dports[i], payload,
                    size, i);

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    double start = now();
    if (duration <= 0) {
        /* burst: ROUNDS rounds, paced at rate */
        for (int r = 0; r < rounds && !stop; r++) {
            double round_start = now();
            for (long k = 0; k < n && !stop; k += BATCH) {
                long count = n - k < BATCH ? n - k : BATCH;
                send_range(k, count, n);
                sleep_until(round_start + (k + count) / rate);
            }
            if (r + 1 < rounds) sleep_until(now() + gap);
        }
    } else {
        /* keepalive: each stream once per period, 10 ms ticks */
        double tick = 0.01, end = start + duration;
        long next = 0;
        double owed = 0;
        for (long t = 1; !stop; t++) {
            double due = start + t * tick;
            if (due > end) break;
            owed += n * tick / period;
            long count = (long)owed;
            owed -= count;
            if (count > 0) {
                send_range(next, count, n);
                next = (next + count) % n;
            }
            sleep_until(due);
        }
    }
    printf("{\"streams\": %d, \"sent\": %llu, \"errors\": %llu, \"seconds\": %.3f}\n", n, sent, errors,
           now() - start);
    return 0;
}
