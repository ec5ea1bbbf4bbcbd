#!/usr/bin/env python3
"""The partition of each key (one per line on stdin) among argv[1] partitions, as Herald's
partitioner places a subscription's deliveries (Kafka's default: murmur2 of the key);
prints the partitions, and how many distinct ones the keys fill."""
import sys


def murmur2(data: bytes) -> int:
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) // 4
    for i in range(whole):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = data[4 * whole :]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


if __name__ == "__main__":
    # Kafka's UtilsTest.testMurmur2 vector, as the Rust partitioner's own test checks it.
    assert murmur2(b"21") == (-973_932_308) & 0xFFFFFFFF
    partitions = int(sys.argv[1])
    placed = [partition_for(line.strip(), partitions) for line in sys.stdin if line.strip()]
    print(f"{len(placed)} subscriptions over {len(set(placed))} of {partitions} partitions {sorted(placed)}")
