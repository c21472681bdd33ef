package tenantpg

import "hash/maphash"

// freqSketch estimates how often each database was checked out recently:
// a count-min sketch of 4-bit counters in four rows, halved every
// sampleSize additions (TinyLFU's reset), so that it measures recent
// frequency and its memory is fixed by the budget, whatever the number of
// databases. A database's hash is computed once, when its state is made,
// from its key with a per-driver seed, so a database whose state was
// forgotten and made again keeps its counts. Guarded by budget.mu.
type freqSketch struct {
	rows       [4][]uint64 // 16 counters per word
	mask       uint64      // counters per row - 1
	added      int
	sampleSize int
}

// sketchSeed is the process's seed of database hashes.
var sketchSeed = maphash.MakeSeed()

// hashKey is a database's sketch hash.
func hashKey(k dbKey) uint64 { return maphash.Comparable(sketchSeed, k) }

// init sizes the sketch for a budget of limit backends: about four
// counters per cached database in each row (at least 64, at most 65,536:
// a row's index is 16 bits of the hash) and a halving every ten times the
// budget's checkouts, Caffeine's proportions.
func (s *freqSketch) init(limit int) {
	n := 64
	for n < 4*limit && n < 1<<16 {
		n <<= 1
	}
	for r := range s.rows {
		s.rows[r] = make([]uint64, n/16)
	}
	s.mask = uint64(n - 1)
	s.added = 0
	s.sampleSize = 10 * max(limit, 16)
}

// add counts one checkout of the database with hash h: no hashing, no
// allocation, and a halving of the table every sampleSize additions.
func (s *freqSketch) add(h uint64) {
	for r := range s.rows {
		c := h >> (16 * r) & s.mask
		w, sh := c>>4, (c&15)*4
		if s.rows[r][w]>>sh&15 < 15 {
			s.rows[r][w] += 1 << sh
		}
	}
	if s.added++; s.added >= s.sampleSize {
		s.halve()
	}
}

// halve divides every counter by two, so that past popularity fades.
func (s *freqSketch) halve() {
	for r := range s.rows {
		for i, w := range s.rows[r] {
			s.rows[r][i] = w >> 1 & 0x7777777777777777
		}
	}
	s.added /= 2
}

// estimate is the smallest of h's four counters: at least its count since
// the last halvings, more only if every row collides.
func (s *freqSketch) estimate(h uint64) int {
	m := 15
	for r := range s.rows {
		c := h >> (16 * r) & s.mask
		m = min(m, int(s.rows[r][c>>4]>>((c&15)*4)&15))
	}
	return m
}
