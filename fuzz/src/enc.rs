// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The inverse of `arbitrary`'s decoding, for the seed corpus.
//!
//! libFuzzer inputs are decoded with `arbitrary` (derive); to write a seed that decodes to a
//! chosen value we encode it the way `arbitrary` 1.x reads it: integers little-endian, `bool`
//! as one byte (`& 1`), `Option` as a `bool` then the value, a derived enum's variant as a
//! `u32` `t` with `(t * variants) >> 32 == index`, struct and variant fields in order.
//! `tests::seeds_decode_to_themselves` checks every seed against the real decoder, so a
//! change of `arbitrary`'s format fails a test instead of silently producing useless seeds.

/// Appends the bytes `arbitrary` decodes back to `self`.
pub trait Enc {
    fn enc(&self, out: &mut Vec<u8>);
}

/// The smallest `u32` that a derived enum with `n` variants decodes as variant `i`.
pub fn tag(i: u32, n: u32) -> u32 {
    assert!(i < n);
    (u64::from(i) << 32).div_ceil(u64::from(n)) as u32
}

/// Implements [`Enc`] for a derived enum: one arm per variant, with its index, the variant
/// count and the bound fields in declaration order.
///
/// ```ignore
/// enc_enum!(3; E::A => 0 [], E::B(v) => 1 [v], E::C { x, y } => 2 [x, y]);
/// ```
#[macro_export]
macro_rules! enc_enum {
    ($ty:ty, $n:expr; $($pat:pat => $i:literal [$($f:ident),*]),* $(,)?) => {
        impl $crate::enc::Enc for $ty {
            #[allow(unused_variables)]
            fn enc(&self, out: &mut Vec<u8>) {
                match self {
                    $( $pat => {
                        $crate::enc::enc_tag(out, $i, $n);
                        $( $crate::enc::Enc::enc($f, out); )*
                    } )*
                }
            }
        }
    };
}

/// Implements [`Enc`] for a derived struct: its fields in declaration order.
#[macro_export]
macro_rules! enc_struct {
    ($ty:ty; $($f:ident),* $(,)?) => {
        impl $crate::enc::Enc for $ty {
            fn enc(&self, out: &mut Vec<u8>) {
                $( $crate::enc::Enc::enc(&self.$f, out); )*
            }
        }
    };
}

/// Writes a derived enum's variant tag.
pub fn enc_tag(out: &mut Vec<u8>, i: u32, n: u32) {
    tag(i, n).enc(out);
}

macro_rules! enc_int {
    ($($t:ty),*) => {$(
        impl Enc for $t {
            fn enc(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
enc_int!(u8, u16, u32, u64, i8);

impl Enc for bool {
    fn enc(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Enc> Enc for Option<T> {
    fn enc(&self, out: &mut Vec<u8>) {
        self.is_some().enc(out);
        if let Some(v) = self {
            v.enc(out);
        }
    }
}

impl<T: Enc, const N: usize> Enc for [T; N] {
    fn enc(&self, out: &mut Vec<u8>) {
        for v in self {
            v.enc(out);
        }
    }
}

/// A byte string of at most 255 bytes: a length byte, then the bytes (fewer if the input
/// ends first). Decoded by hand so that seeds can hold exact byte strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl<'a> arbitrary::Arbitrary<'a> for Blob {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u8::arbitrary(u)?);
        let take = len.min(u.len());
        Ok(Blob(u.bytes(take)?.to_vec()))
    }
}

impl Enc for Blob {
    fn enc(&self, out: &mut Vec<u8>) {
        assert!(self.0.len() <= 255, "blob of {} bytes", self.0.len());
        out.push(self.0.len() as u8);
        out.extend_from_slice(&self.0);
    }
}

/// Encodes a sequence of items the way the targets read them: one after the other until the
/// input ends.
pub fn enc_all<T: Enc>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        item.enc(&mut out);
    }
    out
}

/// Decodes items one after the other until the input ends (a truncated last item is still
/// decoded: `arbitrary` pads with zeros), at most `max` of them.
pub fn decode_all<'a, T: arbitrary::Arbitrary<'a>>(data: &'a [u8], max: usize) -> Vec<T> {
    let mut u = arbitrary::Unstructured::new(data);
    let mut items = Vec::new();
    while !u.is_empty() && items.len() < max {
        match T::arbitrary(&mut u) {
            Ok(item) => items.push(item),
            Err(_) => break,
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::Arbitrary;

    #[derive(arbitrary::Arbitrary, Debug, PartialEq)]
    enum E {
        A,
        B(u8),
        C { x: u16, y: bool },
    }

    impl Enc for E {
        fn enc(&self, out: &mut Vec<u8>) {
            match self {
                E::A => enc_tag(out, 0, 3),
                E::B(v) => {
                    enc_tag(out, 1, 3);
                    v.enc(out);
                }
                E::C { x, y } => {
                    enc_tag(out, 2, 3);
                    x.enc(out);
                    y.enc(out);
                }
            }
        }
    }

    #[test]
    fn tags_decode() {
        for n in 1..40 {
            for i in 0..n {
                let t = tag(i, n);
                assert_eq!(((u64::from(t) * u64::from(n)) >> 32) as u32, i);
            }
        }
    }

    #[test]
    fn round_trip() {
        let items = vec![E::A, E::B(7), E::C { x: 0x1234, y: true }, E::B(255)];
        let bytes = enc_all(&items);
        assert_eq!(decode_all::<E>(&bytes, 100), items);
        let blob = Blob(vec![1, 2, 3]);
        let mut b = Vec::new();
        blob.enc(&mut b);
        Some(5u64).enc(&mut b);
        let mut u = arbitrary::Unstructured::new(&b);
        assert_eq!(Blob::arbitrary(&mut u).unwrap(), blob);
        assert_eq!(Option::<u64>::arbitrary(&mut u).unwrap(), Some(5));
    }
}
