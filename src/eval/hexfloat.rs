//! Python's `float.hex()` and `float.fromhex()` for finite numbers: the reference files
//! carry every float in this exact form, so tests can compare bit for bit.

/// `x.hex()`.
pub fn format(x: f64) -> String {
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0x0.0p+0");
    }
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let mant = bits & ((1u64 << 52) - 1);
    let (lead, e) = if exp == 0 {
        (0, -1022)
    } else {
        (1, exp - 1023)
    };
    let sign_e = if e < 0 { "-" } else { "+" };
    format!("{sign}0x{lead}.{mant:013x}p{sign_e}{}", e.abs())
}

/// `float.fromhex(s)` for the strings [`format`] writes.
pub fn parse(s: &str) -> Option<f64> {
    let (neg, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let rest = rest.strip_prefix("0x")?;
    let (mantissa, exponent) = rest.split_once('p')?;
    let (int, frac) = mantissa.split_once('.')?;
    let lead = u64::from_str_radix(int, 16).ok()?;
    if lead > 1 || frac.len() > 13 {
        return None;
    }
    let frac_bits = u64::from_str_radix(&format!("{frac:0<13}"), 16).ok()?;
    let e: i32 = exponent.parse().ok()?;
    let bits = if lead == 0 {
        if frac_bits != 0 && e != -1022 {
            return None;
        }
        frac_bits
    } else {
        if !(-1022..=1023).contains(&e) {
            return None;
        }
        ((e + 1023) as u64) << 52 | frac_bits
    };
    let value = f64::from_bits(bits);
    Some(if neg { -value } else { value })
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips() {
        for x in [
            0.5,
            1.0,
            -0.1,
            1e-300,
            f64::MIN_POSITIVE / 8.0,
            123456.789,
            -0.0,
            0.0,
        ] {
            let s = super::format(x);
            assert_eq!(super::parse(&s).unwrap().to_bits(), x.to_bits(), "{s}");
        }
        assert_eq!(super::format(0.5), "0x1.0000000000000p-1");
        assert_eq!(super::format(1.0), "0x1.0000000000000p+0");
        assert_eq!(super::format(0.1), "0x1.999999999999ap-4");
    }
}
