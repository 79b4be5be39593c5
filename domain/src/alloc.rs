//! The allocation map: a root page (written at format: the map's header)
//! and bitmaps of extents, volume slots and tag slots.
//!
//! Each bitmap page has its own lock (`ResourceKind::AllocPage`). A
//! transaction that allocates or frees reads the pages it locked fresh
//! from the device ([`PageView`]) and writes back those it changed; nobody
//! caches the map, so hosts allocating on different pages never wait for
//! one another.

use std::collections::BTreeMap;

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

/// The whole allocation map as read at one moment (listing, usage, check).
#[derive(Clone)]
pub struct AllocMap {
    bits: [Vec<u8>; 3],
    len: [u64; 3],
}

/// Pages that items `start..start + n` of a map lie on.
pub fn page_span(start: u64, n: u64) -> std::ops::RangeInclusive<u64> {
    if n == 0 {
        #[allow(clippy::reversed_empty_ranges)]
        return 1..=0;
    }
    start / BITS_PER_PAGE..=(start + n - 1) / BITS_PER_PAGE
}

/// Items page `p` of a map of `len` items holds.
fn items_on(len: u64, p: u64) -> u64 {
    len.saturating_sub(p * BITS_PER_PAGE).min(BITS_PER_PAGE)
}

/// Free items of a page holding `items` (bits past a map's end are zero:
/// `check_tail`).
fn free_of(bits: &[u8], items: u64) -> u64 {
    items.saturating_sub(bits.iter().map(|b| b.count_ones() as u64).sum())
}

/// Set or clear bit `i` of a page; whether it changed.
fn set_bit(bits: &mut [u8], i: u64, set: bool) -> bool {
    let byte = &mut bits[(i / 8) as usize];
    let old = *byte;
    if set {
        *byte |= 1 << (i % 8);
    } else {
        *byte &= !(1 << (i % 8));
    }
    *byte != old
}

/// Refuse page `p` of `map` if a bit past the map's end is set.
fn check_tail(g: &Geometry, map: usize, p: u64, bits: &[u8]) -> Result<()> {
    let items = items_on(g.bitmap_bits()[map], p);
    match (items..BITS_PER_PAGE).find(|&i| bits[(i / 8) as usize] & (1 << (i % 8)) != 0) {
        None => Ok(()),
        Some(i) => Err(DomainError::corrupt(
            format!("{} bitmap", MAP_NAMES[map]),
            g.bitmap_page_off(map, p),
            format!(
                "bit {} is set beyond the end of the map",
                p * BITS_PER_PAGE + i
            ),
        )),
    }
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
            bits: counts.map(|c| vec![0u8; (c * 4032) as usize]),
            len: g.bitmap_bits(),
        }
    }

    /// Pages for a fresh domain: root then every bitmap page.
    pub fn format_pages(&self, g: &Geometry) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(g.alloc_pages as usize * PAGE as usize);
        buf[..PAGE as usize].copy_from_slice(&encode_root(g, 1, 0, 0));
        for map in 0..3 {
            for p in 0..self.pages(map) {
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
        decode_root(g, &buf[..PAGE as usize])?;
        let mut m = AllocMap::empty(g);
        for map in 0..3 {
            for p in 0..m.pages(map) {
                let off = (g.bitmap_page_off(map, p) - g.alloc_off) as usize;
                let (_, bits) = decode_page(g, map, p, &buf[off..off + PAGE as usize])?;
                check_tail(g, map, p, &bits)?;
                m.bits[map][(p * 4032) as usize..((p + 1) * 4032) as usize].copy_from_slice(&bits);
            }
        }
        Ok(m)
    }

    fn pages(&self, map: usize) -> u64 {
        self.bits[map].len() as u64 / 4032
    }

    fn page_bits(&self, map: usize, p: u64) -> &[u8] {
        &self.bits[map][(p * 4032) as usize..((p + 1) * 4032) as usize]
    }

    /// Whether item `bit` of `map` is in use.
    pub fn is_set(&self, map: usize, bit: u64) -> bool {
        self.bits[map][(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    /// Items in use in `map`.
    pub fn count_set(&self, map: usize) -> u64 {
        self.bits[map].iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Free items on each page of `map`.
    pub fn free_per_page(&self, map: usize) -> Vec<u64> {
        (0..self.pages(map))
            .map(|p| free_of(self.page_bits(map, p), items_on(self.len[map], p)))
            .collect()
    }

    /// Highest used item of `map`, plus one (0 if none).
    pub fn high_water(&self, map: usize) -> u64 {
        match self.bits[map].iter().rposition(|&b| b != 0) {
            Some(i) => i as u64 * 8 + 8 - self.bits[map][i].leading_zeros() as u64,
            None => 0,
        }
    }
}

/// The pages of the allocation map a transaction holds the locks of, read
/// fresh from the device under those locks. Items on pages not held count
/// as taken: a transaction allocates only where it holds the lock, so
/// transactions on different pages (different hosts, by default) never
/// wait for each other.
pub struct PageView {
    pages: [BTreeMap<u64, ViewPage>; 3],
    len: [u64; 3],
    counts: [u64; 3],
}

struct ViewPage {
    generation: u64,
    token: u64,
    bits: [u8; 4032],
}

impl PageView {
    /// Read pages `(map, index)` from the device.
    pub fn load(dev: &dyn BlockDev, g: &Geometry, wanted: &[(usize, u64)]) -> Result<PageView> {
        let mut v = PageView {
            pages: Default::default(),
            len: g.bitmap_bits(),
            counts: g.bitmap_page_counts(),
        };
        for &(map, p) in wanted {
            if p >= v.counts[map] || v.pages[map].contains_key(&p) {
                continue;
            }
            let off = g.bitmap_page_off(map, p);
            let mut buf = AlignedBuf::zeroed(PAGE as usize);
            dev.read_at(&mut buf, off)
                .map_err(DomainError::io("reading the allocation map"))?;
            let (generation, bits) = decode_page(g, map, p, &buf)?;
            let token = BitmapPageRaw::ref_from_bytes(&buf[..])
                .expect("page")
                .token
                .get();
            check_tail(g, map, p, &bits)?;
            v.pages[map].insert(
                p,
                ViewPage {
                    generation,
                    token,
                    bits,
                },
            );
        }
        Ok(v)
    }

    /// Whether page `p` of `map` is here.
    pub fn has(&self, map: usize, p: u64) -> bool {
        self.pages[map].contains_key(&p)
    }

    /// The token page `p` of `map` was last written under.
    pub fn token(&self, map: usize, p: u64) -> Option<u64> {
        self.pages[map].get(&p).map(|pg| pg.token)
    }

    /// The pages here, by map.
    pub fn held(&self) -> Vec<(usize, u64)> {
        (0..3)
            .flat_map(|m| self.pages[m].keys().map(move |&p| (m, p)))
            .collect()
    }

    /// Pages of `map` that items `start..start + n` lie on but are not here.
    pub fn missing(&self, map: usize, start: u64, n: u64) -> Vec<u64> {
        page_span(start, n)
            .filter(|&p| p < self.counts[map] && !self.has(map, p))
            .collect()
    }

    /// Pages of `map` not here.
    pub fn all_missing(&self, map: usize) -> Vec<u64> {
        (0..self.counts[map])
            .filter(|p| !self.has(map, *p))
            .collect()
    }

    /// Free items on page `p` of `map` (0 if it is not here).
    pub fn free_on(&self, map: usize, p: u64) -> u64 {
        self.pages[map]
            .get(&p)
            .map_or(0, |pg| free_of(&pg.bits, items_on(self.len[map], p)))
    }

    /// Whether item `b` of `map` is free here (its page held, in the map,
    /// not set).
    fn free(&self, map: usize, b: u64) -> bool {
        b < self.len[map]
            && self.pages[map]
                .get(&(b / BITS_PER_PAGE))
                .is_some_and(|pg| !pg.is_set(b % BITS_PER_PAGE))
    }

    /// Whether `n` items from `start` are free here, also avoiding `taken`.
    pub fn run_is_free(&self, map: usize, start: u64, n: u64, taken: &[(u64, u64)]) -> bool {
        (start..start + n).all(|b| self.free(map, b))
            && taken.iter().all(|&(s, c)| start + n <= s || s + c <= start)
    }

    /// Find `n` contiguous free items on the pages here, avoiding `taken`,
    /// searching from `from` and wrapping around (next fit).
    pub fn find_run(&self, map: usize, n: u64, taken: &[(u64, u64)], from: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let ok = |b: u64| self.free(map, b) && !taken.iter().any(|&(s, c)| b >= s && b < s + c);
        // Contiguous stretches of the pages here, the one holding `from`
        // first.
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for &p in self.pages[map].keys() {
            let (lo, hi) = (
                p * BITS_PER_PAGE,
                ((p + 1) * BITS_PER_PAGE).min(self.len[map]),
            );
            match spans.last_mut() {
                Some(last) if last.1 == lo => last.1 = hi,
                _ => spans.push((lo, hi)),
            }
        }
        let mut tries: Vec<(u64, u64)> = Vec::new();
        for &(lo, hi) in &spans {
            if (lo..hi).contains(&from) {
                tries.insert(0, (from, hi));
                tries.push((lo, (from + n).min(hi)));
            } else {
                tries.push((lo, hi));
            }
        }
        for (lo, hi) in tries {
            let mut b = lo;
            while b + n <= hi {
                let mut run = 0;
                while run < n && ok(b + run) {
                    run += 1;
                }
                if run == n {
                    return Some(b);
                }
                b += run + 1;
            }
        }
        None
    }

    /// Longest free run of `map` on the pages here, for error messages.
    pub fn largest_free_run(&self, map: usize) -> u64 {
        let (mut best, mut cur, mut prev) = (0, 0, None);
        for &p in self.pages[map].keys() {
            if prev != Some(p.wrapping_sub(1)) {
                cur = 0;
            }
            prev = Some(p);
            for b in p * BITS_PER_PAGE..((p + 1) * BITS_PER_PAGE).min(self.len[map]) {
                if self.free(map, b) {
                    cur += 1;
                    best = best.max(cur);
                } else {
                    cur = 0;
                }
            }
        }
        best
    }

    /// Set or clear `n` bits from `start` (all on pages here); returns the
    /// pages touched.
    pub fn apply(&mut self, map: usize, start: u64, n: u64, set: bool) -> Vec<u64> {
        for b in start..start + n {
            let pg = self.pages[map]
                .get_mut(&(b / BITS_PER_PAGE))
                .expect("planned only on pages held");
            set_bit(&mut pg.bits, b % BITS_PER_PAGE, set);
        }
        page_span(start, n).collect()
    }

    /// Write the touched pages, each under the token of its lock
    /// (`token(map, page)`). Not flushed.
    pub fn write(
        &mut self,
        dev: &dyn BlockDev,
        g: &Geometry,
        touched: &[(usize, u64)],
        token: impl Fn(usize, u64) -> u64,
    ) -> Result<()> {
        let mut touched = touched.to_vec();
        touched.sort_unstable();
        touched.dedup();
        for (map, p) in touched {
            let t = token(map, p);
            let pg = self.pages[map].get_mut(&p).expect("written only if held");
            pg.generation += 1;
            pg.token = t;
            let page = encode_page(g, map, p, &pg.bits, pg.generation, t);
            dev.write_at(&page, g.bitmap_page_off(map, p))
                .map_err(DomainError::io("writing the allocation map"))?;
        }
        Ok(())
    }
}

impl ViewPage {
    fn is_set(&self, i: u64) -> bool {
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
}

/// Set or clear bits directly on the device, writing only pages that
/// change. Recovery uses this: it must not write a page another host may
/// be changing unless the bits need it.
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
    for p in page_span(start, count) {
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
            page_changed |= set_bit(&mut bits, b, set);
        }
        if page_changed {
            dev.write_at(&encode_page(g, map, p, &bits, gen + 1, token), off)
                .map_err(DomainError::io("writing the allocation map"))?;
            changed = true;
        }
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

    /// A map of volume slots three pages long.
    fn paged() -> (Geometry, MemDev) {
        let p = FormatParams {
            name: "a".into(),
            volume_slots: Some((3 * BITS_PER_PAGE - 10) as u32),
            tag_slots: Some(100),
            host_slots: Some(2),
            journal_size: Some(1 << 16),
            ..Default::default()
        };
        let g = Geometry::compute(128 << 20, 512, &p, uuid::Uuid::new_v4(), 0).unwrap();
        let dev = MemDev::new(g.device_size);
        dev.write_at(&AllocMap::empty(&g).format_pages(&g), g.alloc_off)
            .unwrap();
        (g, dev)
    }

    #[test]
    fn find_run_next_fit_and_exclusions() {
        let g = geom();
        let dev = MemDev::new(g.device_size);
        dev.write_at(&AllocMap::empty(&g).format_pages(&g), g.alloc_off)
            .unwrap();
        let mut v = PageView::load(&dev, &g, &[(EXTENTS, 0)]).unwrap();
        let a = v.find_run(EXTENTS, 3, &[], 0).unwrap();
        assert_eq!(a, 0);
        v.apply(EXTENTS, a, 3, true);
        let b = v.find_run(EXTENTS, 2, &[(3, 2)], 3).unwrap();
        assert_eq!(b, 5);
        v.apply(EXTENTS, 0, 3, false);
        // Next fit starts at the cursor and wraps around to freed space.
        let len = g.bitmap_bits()[EXTENTS];
        v.apply(EXTENTS, 3, len - 3, true);
        assert_eq!(v.find_run(EXTENTS, 3, &[], 40), Some(0));
        assert_eq!(v.find_run(EXTENTS, 4, &[], 0), None);
        assert_eq!(v.largest_free_run(EXTENTS), 3);
        assert_eq!(v.free_on(EXTENTS, 0), 3);
    }

    #[test]
    fn a_view_allocates_only_on_the_pages_it_holds() {
        let (g, dev) = paged();
        assert_eq!(g.bitmap_page_counts()[VOLUME_SLOTS], 3);
        let v = PageView::load(&dev, &g, &[(VOLUME_SLOTS, 1)]).unwrap();
        assert!(v.has(VOLUME_SLOTS, 1) && !v.has(VOLUME_SLOTS, 0));
        // Items on pages not held count as taken.
        assert_eq!(
            v.find_run(VOLUME_SLOTS, 1, &[], 0),
            Some(BITS_PER_PAGE),
            "the first free slot of page 1"
        );
        assert_eq!(
            v.find_run(VOLUME_SLOTS, 1, &[(BITS_PER_PAGE, 2)], 0),
            Some(BITS_PER_PAGE + 2)
        );
        assert_eq!(
            v.find_run(VOLUME_SLOTS, 1, &[], BITS_PER_PAGE + 7),
            Some(BITS_PER_PAGE + 7)
        );
        assert!(!v.run_is_free(VOLUME_SLOTS, BITS_PER_PAGE - 1, 2, &[]));
        assert!(v.run_is_free(VOLUME_SLOTS, BITS_PER_PAGE, 2, &[]));
        assert_eq!(v.missing(VOLUME_SLOTS, BITS_PER_PAGE - 1, 2), vec![0]);
        assert_eq!(v.all_missing(VOLUME_SLOTS), vec![0, 2]);
        assert_eq!(v.free_on(VOLUME_SLOTS, 1), BITS_PER_PAGE);
        assert_eq!(v.free_on(VOLUME_SLOTS, 0), 0, "not held");
        // A run longer than the pages held is not found.
        assert_eq!(v.find_run(VOLUME_SLOTS, BITS_PER_PAGE + 1, &[], 0), None);
        let both = PageView::load(&dev, &g, &[(VOLUME_SLOTS, 1), (VOLUME_SLOTS, 2)]).unwrap();
        // The last page is short: 3 pages minus 10 items.
        assert_eq!(both.free_on(VOLUME_SLOTS, 2), BITS_PER_PAGE - 10);
        assert_eq!(
            both.find_run(VOLUME_SLOTS, BITS_PER_PAGE + 1, &[], 0),
            Some(BITS_PER_PAGE)
        );
    }

    #[test]
    fn pages_round_trip_through_a_device() {
        let (g, dev) = paged();
        let mut v = PageView::load(&dev, &g, &[(VOLUME_SLOTS, 0), (VOLUME_SLOTS, 2)]).unwrap();
        let mut touched: Vec<_> = v
            .apply(VOLUME_SLOTS, 7, 1, true)
            .into_iter()
            .map(|p| (VOLUME_SLOTS, p))
            .collect();
        touched.extend(
            v.apply(VOLUME_SLOTS, 2 * BITS_PER_PAGE + 3, 2, true)
                .into_iter()
                .map(|p| (VOLUME_SLOTS, p)),
        );
        v.write(&dev, &g, &touched, |_, p| 100 + p).unwrap();
        let loaded = AllocMap::load(&dev, &g).unwrap();
        assert!(loaded.is_set(VOLUME_SLOTS, 7));
        assert_eq!(loaded.count_set(VOLUME_SLOTS), 3);
        assert_eq!(loaded.high_water(VOLUME_SLOTS), 2 * BITS_PER_PAGE + 5);
        assert_eq!(
            loaded.free_per_page(VOLUME_SLOTS),
            vec![BITS_PER_PAGE - 1, BITS_PER_PAGE, BITS_PER_PAGE - 12]
        );
        let again = PageView::load(&dev, &g, &[(VOLUME_SLOTS, 0), (VOLUME_SLOTS, 2)]).unwrap();
        assert_eq!(again.token(VOLUME_SLOTS, 0), Some(100));
        assert_eq!(again.token(VOLUME_SLOTS, 2), Some(102));
        assert_eq!(again.free_on(VOLUME_SLOTS, 0), BITS_PER_PAGE - 1);
    }
}
