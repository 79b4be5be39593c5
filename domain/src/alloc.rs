//! The allocation map: bitmaps of extents, volume slots and tag slots, plus
//! a root page whose generation tells whether a cached copy is current.
//!
//! The map is only changed under the domain's allocation lock. A host that
//! takes the lock reads the root; if its generation moved, another host
//! changed the map and the cache is reloaded.

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::{DomainError, Result};
use crate::geometry::Geometry;
use crate::io::{AlignedBuf, BlockDev};
use crate::layout::*;

/// Bitmap numbers.
pub const EXTENTS: usize = 0;
/// Bitmap numbers.
pub const VOLUME_SLOTS: usize = 1;
/// Bitmap numbers.
pub const TAG_SLOTS: usize = 2;

const MAP_NAMES: [&str; 3] = ["extent", "volume slot", "tag slot"];

/// The cached allocation map.
#[derive(Clone)]
pub struct AllocMap {
    root_gen: u64,
    bits: [Vec<u8>; 3],
    page_gens: [Vec<u64>; 3],
    len: [u64; 3],
    cursor: [u64; 3],
}

/// Encode the root page.
pub fn encode_root(g: &Geometry, generation: u64, token: u64, writer: u16) -> AlignedBuf {
    let mut r = AllocRootRaw::new_zeroed();
    r.magic = ROOT_MAGIC;
    r.version.set(RECORD_VERSION);
    r.generation.set(generation);
    r.token.set(token);
    r.writer_slot.set(writer);
    let c = g.bitmap_page_counts();
    r.extent_pages.set(c[0] as u32);
    r.volume_pages.set(c[1] as u32);
    r.tag_pages.set(c[2] as u32);
    let mut buf = AlignedBuf::from_slice(r.as_bytes(), PAGE as usize);
    seal(&g.salt(), &mut buf);
    buf
}

/// Decode and check the root page; returns (generation, token).
pub fn decode_root(g: &Geometry, bytes: &[u8]) -> Result<(u64, u64)> {
    let r = AllocRootRaw::ref_from_bytes(bytes).expect("page");
    let bad = |d: &str| DomainError::corrupt("allocation map root", g.alloc_off, d);
    if r.magic != ROOT_MAGIC || r.version.get() != RECORD_VERSION {
        return Err(bad("bad magic or version"));
    }
    if !verify(&g.salt(), bytes) {
        return Err(bad("checksum mismatch"));
    }
    let c = g.bitmap_page_counts();
    if [
        r.extent_pages.get() as u64,
        r.volume_pages.get() as u64,
        r.tag_pages.get() as u64,
    ] != c
    {
        return Err(bad("page counts disagree with the superblock"));
    }
    Ok((r.generation.get(), r.token.get()))
}

/// Encode one bitmap page.
pub fn encode_page(
    g: &Geometry,
    map: usize,
    index: u64,
    bits: &[u8],
    generation: u64,
    token: u64,
) -> AlignedBuf {
    let mut p = BitmapPageRaw::new_zeroed();
    p.magic = BITMAP_MAGIC;
    p.version.set(RECORD_VERSION);
    p.map = map as u8 + 1;
    p.index.set(index as u32);
    p.generation.set(generation);
    p.token.set(token);
    p.bits.copy_from_slice(bits);
    let mut buf = AlignedBuf::from_slice(p.as_bytes(), PAGE as usize);
    seal(&g.salt(), &mut buf);
    buf
}

/// Decode one bitmap page; returns (generation, bits).
pub fn decode_page(
    g: &Geometry,
    map: usize,
    index: u64,
    bytes: &[u8],
) -> Result<(u64, [u8; 4032])> {
    let p = BitmapPageRaw::ref_from_bytes(bytes).expect("page");
    let what = format!("{} bitmap page {index}", MAP_NAMES[map]);
    let off = g.bitmap_page_off(map, index);
    if p.magic != BITMAP_MAGIC || p.version.get() != RECORD_VERSION {
        return Err(DomainError::corrupt(what, off, "bad magic or version"));
    }
    if !verify(&g.salt(), bytes) {
        return Err(DomainError::corrupt(what, off, "checksum mismatch"));
    }
    if p.map as usize != map + 1 || p.index.get() as u64 != index {
        return Err(DomainError::corrupt(what, off, "page belongs elsewhere"));
    }
    Ok((p.generation.get(), p.bits))
}

impl AllocMap {
    /// An empty map for a freshly formatted domain.
    pub fn empty(g: &Geometry) -> AllocMap {
        let counts = g.bitmap_page_counts();
        AllocMap {
            root_gen: 1,
            bits: counts.map(|c| vec![0u8; (c * 4032) as usize]),
            page_gens: counts.map(|c| vec![1u64; c as usize]),
            len: g.bitmap_bits(),
            cursor: [0; 3],
        }
    }

    /// Pages for a fresh domain: root then every bitmap page.
    pub fn format_pages(&self, g: &Geometry) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(g.alloc_pages as usize * PAGE as usize);
        buf[..PAGE as usize].copy_from_slice(&encode_root(g, self.root_gen, 0, 0));
        for map in 0..3 {
            for p in 0..self.page_gens[map].len() as u64 {
                let off = (g.bitmap_page_off(map, p) - g.alloc_off) as usize;
                let page = encode_page(g, map, p, self.page_bits(map, p), 1, 0);
                buf[off..off + PAGE as usize].copy_from_slice(&page);
            }
        }
        buf
    }

    /// Read the whole map from the device.
    pub fn load(dev: &dyn BlockDev, g: &Geometry) -> Result<AllocMap> {
        let mut buf = AlignedBuf::zeroed(g.alloc_pages as usize * PAGE as usize);
        dev.read_at(&mut buf, g.alloc_off)
            .map_err(DomainError::io("reading the allocation map"))?;
        let (root_gen, _) = decode_root(g, &buf[..PAGE as usize])?;
        let mut m = AllocMap::empty(g);
        m.root_gen = root_gen;
        #[allow(clippy::needless_range_loop)]
        for map in 0..3 {
            for p in 0..m.page_gens[map].len() as u64 {
                let off = (g.bitmap_page_off(map, p) - g.alloc_off) as usize;
                let (gen, bits) = decode_page(g, map, p, &buf[off..off + PAGE as usize])?;
                m.page_gens[map][p as usize] = gen;
                m.bits[map][(p * 4032) as usize..((p + 1) * 4032) as usize].copy_from_slice(&bits);
            }
            if let Some(bad) = (m.len[map]..m.page_gens[map].len() as u64 * BITS_PER_PAGE)
                .find(|&b| m.is_set(map, b))
            {
                return Err(DomainError::corrupt(
                    format!("{} bitmap", MAP_NAMES[map]),
                    g.bitmap_page_off(map, bad / BITS_PER_PAGE),
                    format!("bit {bad} is set beyond the end of the map"),
                ));
            }
        }
        Ok(m)
    }

    /// Reload if another host changed the map. Call under the allocation lock.
    pub fn refresh(&mut self, dev: &dyn BlockDev, g: &Geometry) -> Result<bool> {
        let mut root = AlignedBuf::zeroed(PAGE as usize);
        dev.read_at(&mut root, g.alloc_off)
            .map_err(DomainError::io("reading the allocation map root"))?;
        let (gen, _) = decode_root(g, &root)?;
        if gen == self.root_gen {
            return Ok(false);
        }
        let cursor = self.cursor;
        *self = AllocMap::load(dev, g)?;
        self.cursor = cursor;
        Ok(true)
    }

    fn page_bits(&self, map: usize, p: u64) -> &[u8] {
        &self.bits[map][(p * 4032) as usize..((p + 1) * 4032) as usize]
    }

    /// Whether item `bit` of `map` is in use.
    pub fn is_set(&self, map: usize, bit: u64) -> bool {
        self.bits[map][(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    /// Items in `map`.
    pub fn len(&self, map: usize) -> u64 {
        self.len[map]
    }

    /// Whether `map` tracks no items at all.
    pub fn is_empty(&self, map: usize) -> bool {
        self.len[map] == 0
    }

    /// Items in use in `map`.
    pub fn count_set(&self, map: usize) -> u64 {
        self.bits[map].iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Highest used item of `map`, plus one (0 if none).
    pub fn high_water(&self, map: usize) -> u64 {
        match self.bits[map].iter().rposition(|&b| b != 0) {
            Some(i) => i as u64 * 8 + 8 - self.bits[map][i].leading_zeros() as u64,
            None => 0,
        }
    }

    fn free_in(&self, map: usize, start: u64, n: u64, taken: &[(u64, u64)]) -> bool {
        start + n <= self.len[map]
            && (start..start + n).all(|b| !self.is_set(map, b))
            && taken.iter().all(|&(s, c)| start + n <= s || s + c <= start)
    }

    /// Whether `n` items from `start` are free, also avoiding `taken`.
    pub fn run_is_free(&self, map: usize, start: u64, n: u64, taken: &[(u64, u64)]) -> bool {
        self.free_in(map, start, n, taken)
    }

    /// Find `n` contiguous free items (next fit), avoiding `taken`.
    pub fn find_run(&mut self, map: usize, n: u64, taken: &[(u64, u64)]) -> Option<u64> {
        let len = self.len[map];
        if n == 0 || n > len {
            return None;
        }
        let start_at = self.cursor[map].min(len);
        for pass in 0..2 {
            let (mut b, end) = if pass == 0 {
                (start_at, len)
            } else {
                (0, (start_at + n).min(len))
            };
            while b + n <= end {
                // Skip whole used bytes quickly.
                if b % 8 == 0 && self.bits[map][(b / 8) as usize] == 0xff {
                    b += 8;
                    continue;
                }
                if self.is_set(map, b) || taken.iter().any(|&(s, c)| b >= s && b < s + c) {
                    b += 1;
                    continue;
                }
                let mut run = 0;
                while run < n
                    && !self.is_set(map, b + run)
                    && !taken.iter().any(|&(s, c)| b + run >= s && b + run < s + c)
                {
                    run += 1;
                }
                if run == n {
                    self.cursor[map] = b + n;
                    return Some(b);
                }
                b += run + 1;
            }
        }
        None
    }

    /// Longest free run of `map`, for error messages.
    pub fn largest_free_run(&self, map: usize) -> u64 {
        let (mut best, mut cur) = (0, 0);
        for b in 0..self.len[map] {
            if self.is_set(map, b) {
                cur = 0;
            } else {
                cur += 1;
                best = best.max(cur);
            }
        }
        best
    }

    /// Set or clear `n` bits from `start`; returns the pages touched.
    pub fn apply(&mut self, map: usize, start: u64, n: u64, set: bool) -> Vec<u64> {
        for b in start..start + n {
            let byte = &mut self.bits[map][(b / 8) as usize];
            if set {
                *byte |= 1 << (b % 8);
            } else {
                *byte &= !(1 << (b % 8));
            }
        }
        if n == 0 {
            return Vec::new();
        }
        (start / BITS_PER_PAGE..=(start + n - 1) / BITS_PER_PAGE).collect()
    }

    /// Write the touched pages and a new root. Not flushed.
    pub fn write_pages(
        &mut self,
        dev: &dyn BlockDev,
        g: &Geometry,
        touched: &[(usize, u64)],
        token: u64,
        writer: u16,
    ) -> Result<()> {
        let mut touched = touched.to_vec();
        touched.sort_unstable();
        touched.dedup();
        for &(map, p) in &touched {
            let gen = self.page_gens[map][p as usize] + 1;
            self.page_gens[map][p as usize] = gen;
            let page = encode_page(g, map, p, self.page_bits(map, p), gen, token);
            dev.write_at(&page, g.bitmap_page_off(map, p))
                .map_err(DomainError::io("writing the allocation map"))?;
        }
        if !touched.is_empty() {
            self.root_gen += 1;
            dev.write_at(&encode_root(g, self.root_gen, token, writer), g.alloc_off)
                .map_err(DomainError::io("writing the allocation map root"))?;
        }
        Ok(())
    }

    /// The raw bits of `map` (for check and dump).
    pub fn bits(&self, map: usize) -> &[u8] {
        &self.bits[map]
    }
}

/// Set or clear bits directly on the device, writing only pages that
/// change, and bump the root if any did. Recovery uses this: it must not
/// write a page another host may be changing unless the bits need it.
pub fn apply_on_disk(
    dev: &dyn BlockDev,
    g: &Geometry,
    map: usize,
    start: u64,
    count: u64,
    set: bool,
) -> Result<bool> {
    if count == 0 {
        return Ok(false);
    }
    if start + count > g.bitmap_bits()[map] {
        return Err(DomainError::corrupt(
            format!("{} bitmap", MAP_NAMES[map]),
            g.bitmap_page_off(map, 0),
            format!(
                "journal names bits {start}..{} beyond the map",
                start + count
            ),
        ));
    }
    let mut changed = false;
    for p in start / BITS_PER_PAGE..=(start + count - 1) / BITS_PER_PAGE {
        let off = g.bitmap_page_off(map, p);
        let mut buf = AlignedBuf::zeroed(PAGE as usize);
        dev.read_at(&mut buf, off)
            .map_err(DomainError::io("reading the allocation map"))?;
        let (gen, mut bits) = decode_page(g, map, p, &buf)?;
        let token = BitmapPageRaw::ref_from_bytes(&buf[..])
            .expect("page")
            .token
            .get();
        let lo = start.max(p * BITS_PER_PAGE) - p * BITS_PER_PAGE;
        let hi = (start + count).min((p + 1) * BITS_PER_PAGE) - p * BITS_PER_PAGE;
        let mut page_changed = false;
        for b in lo..hi {
            let byte = &mut bits[(b / 8) as usize];
            let old = *byte;
            if set {
                *byte |= 1 << (b % 8);
            } else {
                *byte &= !(1 << (b % 8));
            }
            page_changed |= *byte != old;
        }
        if page_changed {
            dev.write_at(&encode_page(g, map, p, &bits, gen + 1, token), off)
                .map_err(DomainError::io("writing the allocation map"))?;
            changed = true;
        }
    }
    if changed {
        let mut root = AlignedBuf::zeroed(PAGE as usize);
        dev.read_at(&mut root, g.alloc_off)
            .map_err(DomainError::io("reading the allocation map root"))?;
        let (gen, token) = decode_root(g, &root)?;
        let writer = AllocRootRaw::ref_from_bytes(&root[..])
            .expect("page")
            .writer_slot
            .get();
        dev.write_at(&encode_root(g, gen + 1, token, writer), g.alloc_off)
            .map_err(DomainError::io("writing the allocation map root"))?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::FormatParams;
    use crate::io::MemDev;

    fn geom() -> Geometry {
        let p = FormatParams {
            name: "a".into(),
            volume_slots: Some(100),
            tag_slots: Some(100),
            host_slots: Some(2),
            journal_size: Some(1 << 16),
            ..Default::default()
        };
        Geometry::compute(64 << 20, 512, &p, uuid::Uuid::new_v4(), 0).unwrap()
    }

    #[test]
    fn find_run_next_fit_and_exclusions() {
        let g = geom();
        let mut m = AllocMap::empty(&g);
        let a = m.find_run(EXTENTS, 3, &[]).unwrap();
        assert_eq!(a, 0);
        m.apply(EXTENTS, a, 3, true);
        let b = m.find_run(EXTENTS, 2, &[(3, 2)]).unwrap();
        assert_eq!(b, 5);
        m.apply(EXTENTS, 0, 3, false);
        // Next fit wraps around to the freed space eventually.
        let len = m.len(EXTENTS);
        m.apply(EXTENTS, 3, len - 3, true);
        assert_eq!(m.find_run(EXTENTS, 3, &[]), Some(0));
        assert_eq!(m.find_run(EXTENTS, 4, &[]), None);
        assert_eq!(m.largest_free_run(EXTENTS), 3);
    }

    #[test]
    fn pages_round_trip_through_a_device() {
        let g = geom();
        let dev = MemDev::new(g.device_size);
        let mut m = AllocMap::empty(&g);
        dev.write_at(&m.format_pages(&g), g.alloc_off).unwrap();
        let touched = m.apply(VOLUME_SLOTS, 7, 1, true);
        let t: Vec<_> = touched.into_iter().map(|p| (VOLUME_SLOTS, p)).collect();
        m.write_pages(&dev, &g, &t, 5, 0).unwrap();
        let loaded = AllocMap::load(&dev, &g).unwrap();
        assert!(loaded.is_set(VOLUME_SLOTS, 7));
        assert_eq!(loaded.count_set(VOLUME_SLOTS), 1);
        assert_eq!(loaded.high_water(VOLUME_SLOTS), 8);
        let mut stale = AllocMap::empty(&g);
        assert!(stale.refresh(&dev, &g).unwrap());
        assert!(stale.is_set(VOLUME_SLOTS, 7));
        assert!(!stale.refresh(&dev, &g).unwrap());
    }
}
