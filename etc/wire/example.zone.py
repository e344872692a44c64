# The DNS zone of the Wire example, served by Twisted's own DNS server
# (twistd dns --pyzone).  Each backend domain announces its federator with
# the SRV record the Wire federation spec defines; the target is the
# backend's infrastructure domain, which differs from the backend domain.
zone = [
    SOA("example", mname="ns.example", rname="hostmaster.example", serial=2026112201,
        refresh=3600, retry=600, expire=86400, minimum=60, ttl=60),
    SRV("_wire-server-federator._tcp.a.example", 10, 5, 19443, "fed-a.infra.example", ttl=60),
    SRV("_wire-server-federator._tcp.b.example", 10, 5, 29443, "fed-b.infra.example", ttl=60),
    A("fed-a.infra.example", "127.0.0.1", ttl=60),
    A("fed-b.infra.example", "127.0.0.1", ttl=60),
]
