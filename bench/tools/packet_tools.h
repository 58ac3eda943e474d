/* What the packet tools share (udpsend.c, udprecv.c, scalesend.c): a stop flag
 * set by signals, a monotonic clock, and Ethernet + IPv4 + UDP frames built in
 * advance for an AF_PACKET socket. */
#ifndef MEDIAPROXY_BENCH_PACKET_TOOLS_H
#define MEDIAPROXY_BENCH_PACKET_TOOLS_H

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>

static volatile sig_atomic_t stop;
static inline void on_signal(int sig) { (void)sig; stop = 1; }

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline uint16_t checksum(const void *data, size_t len, uint32_t sum) {
    const uint8_t *p = data;
    for (; len > 1; len -= 2, p += 2) sum += (p[0] << 8) | p[1];
    if (len) sum += p[0] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static inline int parse_mac(const char *text, uint8_t mac[6]) {
    unsigned v[6];
    if (sscanf(text, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)v[i];
    return 0;
}

/* An Ethernet + IPv4 + UDP frame into buf; returns its length. */
static inline int build_frame(uint8_t *buf, const uint8_t dmac[6], const uint8_t smac[6], struct in_addr src,
                              struct in_addr dst, int sport, int dport, const void *payload, int size, int id) {
    memcpy(buf, dmac, 6);
    memcpy(buf + 6, smac, 6);
    buf[12] = 0x08;
    buf[13] = 0x00;
    uint8_t *ip = buf + 14, *udp = ip + 20;
    int iplen = 20 + 8 + size;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    ip[2] = iplen >> 8;
    ip[3] = iplen & 0xff;
    ip[4] = (id >> 8) & 0xff;
    ip[5] = id & 0xff;
    ip[6] = 0x40; /* DF */
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    memcpy(ip + 12, &src, 4);
    memcpy(ip + 16, &dst, 4);
    uint16_t c = checksum(ip, 20, 0);
    ip[10] = c >> 8;
    ip[11] = c & 0xff;
    udp[0] = sport >> 8;
    udp[1] = sport & 0xff;
    udp[2] = dport >> 8;
    udp[3] = dport & 0xff;
    udp[4] = (8 + size) >> 8;
    udp[5] = (8 + size) & 0xff;
    udp[6] = udp[7] = 0;
    memcpy(udp + 8, payload, size);
    uint32_t sum = 0; /* pseudo header: addresses, protocol, UDP length */
    const uint8_t *a = ip + 12;
    for (int i = 0; i < 8; i += 2) sum += (a[i] << 8) | a[i + 1];
    sum += IPPROTO_UDP + 8 + size;
    c = checksum(udp, 8 + size, sum);
    if (c == 0) c = 0xffff;
    udp[6] = c >> 8;
    udp[7] = c & 0xff;
    return 14 + iplen;
}

/* An AF_PACKET socket on IFACE that sends frames to the next hop NEXT_HOP_MAC;
 * its own MAC in smac, the next hop's in dmac. -1 (and a message) on failure. */
static inline int open_packet_socket(const char *ifname, const char *next_hop_mac, uint8_t smac[6],
                                     uint8_t dmac[6]) {
    if (parse_mac(next_hop_mac, dmac) < 0) { fprintf(stderr, "bad MAC %s\n", next_hop_mac); return -1; }
    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: sends only, receives nothing */
    if (fd < 0) { perror("socket(AF_PACKET)"); return -1; }
    int one = 1;
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) { perror("SIOCGIFHWADDR"); return -1; }
    memcpy(smac, ifr.ifr_hwaddr.sa_data, 6);
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP),
                             .sll_ifindex = (int)if_nametoindex(ifname)};
    if (!ll.sll_ifindex || bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) { perror("bind(AF_PACKET)"); return -1; }
    return fd;
}

#endif
