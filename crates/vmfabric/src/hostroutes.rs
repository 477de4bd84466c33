//! The host's IPv4 routes, to refuse a network whose subnet would shadow one.

use ipnet::Ipv4Net;

/// Routes from /proc/net/route (except the default route): (destination, interface).
pub fn routes() -> Vec<(Ipv4Net, String)> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The kernel prints addresses as hexadecimal in host (little-endian) byte order.
fn parse(text: &str) -> Vec<(Ipv4Net, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            let prefix = mask.count_ones() as u8;
            let net = Ipv4Net::new(std::net::Ipv4Addr::from(dest.swap_bytes()), prefix).ok()?;
            (prefix > 0).then(|| (net.trunc(), f[0].to_string()))
        })
        .collect()
}

/// A host route that overlaps `subnet`, if any.
pub fn overlapping(subnet: Ipv4Net) -> Option<(Ipv4Net, String)> {
    routes()
        .into_iter()
        .find(|(r, _)| r.contains(&subnet.network()) || subnet.contains(&r.network()))
}

/// The first private /24 that overlaps none of `taken` and no host route: 10.77.0.0/24
/// onwards through 10.254.0.0/24, then 192.168.100.0/24 to 192.168.254.0/24.
pub fn free_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    let routes = routes();
    free_among(taken, &routes)
}

fn free_among(taken: &[Ipv4Net], routes: &[(Ipv4Net, String)]) -> Option<Ipv4Net> {
    let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
    let tens = (77..=254u8).map(|b| std::net::Ipv4Addr::new(10, b, 0, 0));
    let one_nine_twos = (100..=254u8).map(|c| std::net::Ipv4Addr::new(192, 168, c, 0));
    tens.chain(one_nine_twos)
        .filter_map(|a| Ipv4Net::new(a, 24).ok())
        .find(|c| !taken.iter().any(|t| overlaps(t, c)) && !routes.iter().any(|(r, _)| overlaps(r, c)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_subnet_avoids_networks_and_routes() {
        let n = |s: &str| s.parse::<ipnet::Ipv4Net>().unwrap();
        let taken = [n("10.77.0.0/24"), n("10.78.0.0/16")];
        let routes = [
            (n("10.79.0.0/24"), "eth0".to_string()),
            (n("10.80.0.0/20"), "wg0".to_string()),
        ];
        assert_eq!(super::free_among(&taken, &routes), Some(n("10.81.0.0/24")));
        assert_eq!(super::free_among(&[n("10.0.0.0/8")], &[]), Some(n("192.168.100.0/24")));
    }

    #[test]
    fn reads_proc_net_route() {
        let text = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = super::parse(text);
        assert_eq!(r, vec![("192.0.2.0/24".parse().unwrap(), "eth0".to_string())]);
    }
}
