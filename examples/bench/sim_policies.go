package main

// Frequency-aware cache models beside LRU and Belady: segmented LRU (80%
// protected, the driver's policy since #6) and W-TinyLFU (Caffeine's: a 1%
// LRU window in front of an SLRU main cache, with a count-min sketch of
// recent frequency deciding whether the window's victim may replace the
// main cache's). One slot is one workspace's connection, as in sim.go.

// segList is an LRU list threaded through arrays indexed by workspace; a
// workspace is in at most one segList of a model at a time.
type segList struct {
	prev, next []int32 // shared by the model's lists
	head, tail int32
	size       int
}

const noWS = -1

func (l *segList) unlink(x int32) {
	if l.prev[x] != noWS {
		l.next[l.prev[x]] = l.next[x]
	} else {
		l.head = l.next[x]
	}
	if l.next[x] != noWS {
		l.prev[l.next[x]] = l.prev[x]
	} else {
		l.tail = l.prev[x]
	}
	l.size--
}

func (l *segList) pushFront(x int32) {
	l.prev[x], l.next[x] = noWS, l.head
	if l.head != noWS {
		l.prev[l.head] = x
	}
	l.head = x
	if l.tail == noWS {
		l.tail = x
	}
	l.size++
}

func newSegLists(n, count int) []*segList {
	prev, next := make([]int32, n), make([]int32, n)
	out := make([]*segList, count)
	for i := range out {
		out[i] = &segList{prev: prev, next: next, head: noWS, tail: noWS}
	}
	return out
}

const (
	inNone uint8 = iota
	inWindow
	inProbation
	inProtected
)

// simulateSLRU: misses enter probation; a hit in probation promotes to
// protected (at most 80% of k), whose LRU is demoted back to probation.
func simulateSLRU(seq []int32, n, k int) float64 {
	return simulateWTinyLFUWindow(seq, n, k, 0, false)
}

// simulateWTinyLFU: Caffeine's defaults, a window of 1% of k (at least 1)
// and frequency admission into the SLRU main cache.
func simulateWTinyLFU(seq []int32, n, k int) float64 {
	return simulateWTinyLFUWindow(seq, n, k, max(1, k/100), true)
}

func simulateWTinyLFUWindow(seq []int32, n, k, window int, admit bool) float64 {
	if len(seq) == 0 || k < 1 {
		return 0
	}
	if window >= k {
		window = k - 1
	}
	main := k - window
	protectedMax := max(1, main*4/5)
	ls := newSegLists(n, 3)
	win, prob, prot := ls[0], ls[1], ls[2]
	where := make([]uint8, n)
	sk := newSketch(k)
	hits := 0
	evictMain := func() int32 { // the main cache's victim: probation first
		if prob.size > 0 {
			return prob.tail
		}
		return prot.tail
	}
	drop := func(x int32) {
		switch where[x] {
		case inWindow:
			win.unlink(x)
		case inProbation:
			prob.unlink(x)
		case inProtected:
			prot.unlink(x)
		}
		where[x] = inNone
	}
	for _, ws := range seq {
		sk.add(uint64(ws))
		switch where[ws] {
		case inWindow:
			hits++
			win.unlink(ws)
			win.pushFront(ws)
			continue
		case inProbation:
			hits++
			prob.unlink(ws)
			prot.pushFront(ws)
			where[ws] = inProtected
			if prot.size > protectedMax {
				x := prot.tail
				prot.unlink(x)
				prob.pushFront(x)
				where[x] = inProbation
			}
			continue
		case inProtected:
			hits++
			prot.unlink(ws)
			prot.pushFront(ws)
			continue
		}
		// A miss: the new entry goes to the window (or straight to the main
		// cache when there is none); what overflows the window is a
		// candidate for the main cache.
		cand := ws
		if window > 0 {
			win.pushFront(ws)
			where[ws] = inWindow
			if win.size <= window {
				continue
			}
			cand = win.tail
			win.unlink(cand)
			where[cand] = inNone
		}
		if prob.size+prot.size < main {
			prob.pushFront(cand)
			where[cand] = inProbation
			continue
		}
		victim := evictMain()
		if admit && sk.estimate(uint64(cand)) <= sk.estimate(uint64(victim)) {
			continue // the candidate is dropped; the main cache keeps its victim
		}
		drop(victim)
		prob.pushFront(cand)
		where[cand] = inProbation
	}
	return float64(hits) / float64(len(seq))
}

// sketch is a count-min sketch of 4-bit counters, four rows, halved every
// 10·k additions so that it measures recent frequency (TinyLFU's reset).
type sketch struct {
	table   []uint64 // 16 counters per word
	mask    uint64
	added   int
	sampleN int
}

func newSketch(k int) *sketch {
	words := 1
	for words < max(k, 16) {
		words <<= 1
	}
	return &sketch{table: make([]uint64, words), mask: uint64(words*16 - 1), sampleN: 10 * max(k, 16)}
}

func mix(x uint64) uint64 { // splitmix64's finaliser
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func (s *sketch) index(h uint64, row int) (word int, shift uint) {
	h = mix(h + uint64(row)*0x9e3779b97f4a7c15)
	c := h & s.mask
	return int(c >> 4), uint(c&15) * 4
}

func (s *sketch) estimate(key uint64) int {
	h := mix(key)
	m := 15
	for r := 0; r < 4; r++ {
		w, sh := s.index(h, r)
		m = min(m, int(s.table[w]>>sh&15))
	}
	return m
}

func (s *sketch) add(key uint64) {
	h := mix(key)
	for r := 0; r < 4; r++ {
		w, sh := s.index(h, r)
		if s.table[w]>>sh&15 < 15 {
			s.table[w] += 1 << sh
		}
	}
	if s.added++; s.added >= s.sampleN {
		s.added /= 2
		for i := range s.table {
			s.table[i] = s.table[i] >> 1 & 0x7777777777777777
		}
	}
}
