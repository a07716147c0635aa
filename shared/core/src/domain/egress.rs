//! Where the gateway may connect on a client's word: the URL of an input photo (and, later,
//! of a callback). A URL is the client's; the network it reaches is ours. So the gateway
//! connects only over https, only to a public unicast address, and only to the very address it
//! checked (the adapter pins the connection to it, so a second DNS answer cannot swap in an
//! internal one), and it follows no redirect (each would need the same checks).
//!
//! Loopback may be allowed by an explicit switch, for the local stack, whose test hosts are on
//! 127.0.0.1; it then also allows plain http to loopback, and only to loopback.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a URL may not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressRefusal {
    #[error("the URL is not valid")]
    NotAUrl,
    #[error("only https URLs are fetched")]
    NotHttps,
    #[error("the URL may not carry a user name or password")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error("{host} does not resolve")]
    Unresolved { host: String },
    #[error("{host} resolves to {ip}, a {reason} address")]
    Forbidden {
        host: String,
        ip: IpAddr,
        reason: &'static str,
    },
}

/// The rules; the default allows public https addresses only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Loopback addresses (and plain http to them) are allowed: the local stack only.
    pub allow_loopback: bool,
}

/// What to connect to once a URL passed: the host as the URL names it (for TLS and the Host
/// header) and the one address checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub host: String,
    pub address: SocketAddr,
}

impl EgressPolicy {
    /// The URL's own rules, before any resolution: its host and port.
    pub fn check_url(&self, url: &url::Url) -> Result<(String, u16), EgressRefusal> {
        match url.scheme() {
            "https" => {}
            // Plain http only where it cannot leave the machine; the addresses decide.
            "http" if self.allow_loopback => {}
            _ => return Err(EgressRefusal::NotHttps),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressRefusal::Credentials);
        }
        let host = match url.host() {
            Some(url::Host::Domain(domain)) => domain.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(EgressRefusal::NoHost),
        };
        let port = url.port_or_known_default().ok_or(EgressRefusal::NotAUrl)?;
        Ok((host, port))
    }

    /// The address to connect to, among those `host` resolved to: every one must be allowed
    /// (a name that also resolves to an internal address is refused outright, whatever the
    /// order of the answers), and plain http must lead to loopback.
    pub fn pick(
        &self,
        url: &url::Url,
        host: &str,
        addresses: &[SocketAddr],
    ) -> Result<Destination, EgressRefusal> {
        let first = addresses.first().ok_or_else(|| EgressRefusal::Unresolved {
            host: host.to_string(),
        })?;
        for address in addresses {
            let ip = canonical(address.ip());
            let reason = match forbidden_reason(ip) {
                Some("loopback") if self.allow_loopback => None,
                other => other,
            };
            let reason = reason.or_else(|| {
                (url.scheme() == "http" && !ip.is_loopback()).then_some("non-loopback plain http")
            });
            if let Some(reason) = reason {
                return Err(EgressRefusal::Forbidden {
                    host: host.to_string(),
                    ip,
                    reason,
                });
            }
        }
        Ok(Destination {
            host: host.to_string(),
            address: *first,
        })
    }
}

/// An IPv4 address written as IPv6 (mapped, or through the NAT64 prefix) is judged as the IPv4
/// address it reaches.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96, the well-known NAT64 prefix.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// Why `ip` is no public unicast address, if it is not one: the ranges a request from inside a
/// cloud account must never reach on a client's word (the instance metadata service, the VPC,
/// the host itself), and those that are no destination at all.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // 169.254.169.254: EC2's and most clouds' instance metadata service.
        Some("link-local (metadata)")
    } else if a == 100 && (64..=127).contains(&b) {
        // Carrier-grade NAT; also Alibaba's metadata service, 100.100.100.200.
        Some("shared (CGNAT)")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else if ip.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
        Some("documentation or benchmarking")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if s[0] & 0xfe00 == 0xfc00 {
        // Unique local: includes fd00:ec2::254, EC2's IPv6 metadata service.
        Some("unique local (private)")
    } else if s[0] & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        Some("documentation")
    } else if s[0] == 0x0100 && s[1..4] == [0, 0, 0] {
        Some("discard")
    } else if s[0] == 0x2002 {
        // 6to4 embeds an IPv4 address that may be anything.
        Some("6to4")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    fn at(ip: &str) -> Vec<SocketAddr> {
        vec![SocketAddr::new(ip.parse().unwrap(), 443)]
    }

    fn pick(policy: EgressPolicy, u: &str, ips: &[&str]) -> Result<Destination, EgressRefusal> {
        let addresses: Vec<SocketAddr> = ips.iter().flat_map(|ip| at(ip)).collect();
        policy.pick(&url(u), "photos.example", &addresses)
    }

    #[test]
    fn a_public_https_url_goes_to_the_address_checked() {
        let d = pick(
            EgressPolicy::default(),
            "https://photos.example/a.jpg",
            &["93.184.216.34"],
        )
        .unwrap();
        assert_eq!(d.address, at("93.184.216.34")[0]);
        assert_eq!(d.host, "photos.example");
    }

    #[test]
    fn internal_and_special_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(
                pick(EgressPolicy::default(), "https://photos.example/", &[ip]).is_err(),
                "{ip}"
            );
        }
    }

    #[test]
    fn one_internal_answer_among_public_ones_refuses_the_host() {
        let refused = pick(
            EgressPolicy::default(),
            "https://photos.example/",
            &["93.184.216.34", "10.0.0.5"],
        );
        assert!(matches!(
            refused,
            Err(EgressRefusal::Forbidden {
                reason: "private",
                ..
            })
        ));
    }

    #[test]
    fn only_https_without_credentials_is_fetched() {
        let policy = EgressPolicy::default();
        assert_eq!(
            policy.check_url(&url("http://photos.example/")),
            Err(EgressRefusal::NotHttps)
        );
        assert_eq!(
            policy.check_url(&url("ftp://photos.example/")),
            Err(EgressRefusal::NotHttps)
        );
        assert_eq!(
            policy.check_url(&url("https://user:pw@photos.example/")),
            Err(EgressRefusal::Credentials)
        );
        assert_eq!(
            policy.check_url(&url("https://Photos.Example:8443/a")),
            Ok(("photos.example".into(), 8443))
        );
    }

    #[test]
    fn the_loopback_switch_allows_loopback_and_plain_http_to_it_only() {
        let local = EgressPolicy {
            allow_loopback: true,
        };
        assert!(pick(local, "http://photos.example/", &["127.0.0.1"]).is_ok());
        assert!(pick(local, "https://photos.example/", &["::1"]).is_ok());
        assert!(pick(local, "http://photos.example/", &["93.184.216.34"]).is_err());
        assert!(pick(local, "https://photos.example/", &["10.0.0.1"]).is_err());
        assert!(local.check_url(&url("http://127.0.0.1:8080/x")).is_ok());
    }

    #[test]
    fn a_host_without_addresses_is_unresolved() {
        assert!(matches!(
            pick(EgressPolicy::default(), "https://photos.example/", &[]),
            Err(EgressRefusal::Unresolved { .. })
        ));
    }
}
