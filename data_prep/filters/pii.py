"""PII scrubbing: e-mail addresses and public IP addresses are replaced by placeholders.

Like the FineWeb pipeline (Penedo et al. 2024) this anonymises rather than drops: an address
is replaced by `email@example.com`, a publicly routable IPv4/IPv6 address by a documentation
address (RFC 5737 / RFC 3849). Private, loopback and reserved IPs (127.0.0.1, 10.x, ...) are
kept, since in code and documentation they are not personal data. Version numbers that happen
to look like a public IPv4 address (e.g. section "8.2.4.44" of a spec) are replaced too; that
is the price of a regex, and why IP scrubbing applies to prose only by default (in code such
strings are version numbers, spec sections and network constants like '224.0.0.0/4').
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from data_prep.document import Document, Drop
from data_prep.steps import Step

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4})*(?![\w:.])"
)
EMAIL_PLACEHOLDER = "email@example.com"
IPV4_PLACEHOLDER = "192.0.2.1"  # TEST-NET-1, RFC 5737
IPV6_PLACEHOLDER = "2001:db8::1"  # documentation prefix, RFC 3849
_KEEP_DOMAINS = ("example.com", "example.org", "example.net")


@dataclass
class PIIConfig:
    enabled: bool = True
    email_domains: list[str] = field(default_factory=lambda: ["prose", "code"])  # [] = off
    ip_domains: list[str] = field(default_factory=lambda: ["prose"])  # [] = off


class PIIScrubber(Step):
    name = "pii"
    reasons = ()  # never drops

    def __init__(self, cfg: PIIConfig) -> None:
        self.cfg = cfg
        self.domains = tuple(sorted(set(cfg.email_domains) | set(cfg.ip_domains)))

    def _email(self, m: re.Match) -> str:
        if m.group(0).lower().endswith(_KEEP_DOMAINS):
            return m.group(0)
        self.bump("emails_replaced")
        return EMAIL_PLACEHOLDER

    def _ip(self, m: re.Match) -> str:
        try:
            ip = ipaddress.ip_address(m.group(0))
        except ValueError:
            return m.group(0)
        if not ip.is_global or str(ip) in (IPV4_PLACEHOLDER, "2001:db8::1"):
            return m.group(0)
        self.bump("ips_replaced")
        return IPV4_PLACEHOLDER if ip.version == 4 else IPV6_PLACEHOLDER

    def process(self, doc: Document) -> Document | Drop:
        text = doc.text
        if doc.domain in self.cfg.email_domains and "@" in text:
            text = EMAIL.sub(self._email, text)
        if doc.domain in self.cfg.ip_domains:
            text = IPV4.sub(self._ip, text)
            if "::" in text or text.count(":") >= 7:
                text = IPV6.sub(self._ip, text)
        return doc if text == doc.text else replace(doc, text=text)
