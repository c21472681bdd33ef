package main

// Cache simulations: how often a cache of k workspace slots would already
// hold the workspace an operation asks for, under LRU and under Belady's
// offline optimum (MIN: evict the workspace whose next use is furthest in
// the future). The model is deliberately simple: a slot is one workspace's
// connection, an operation is a hit when its workspace holds a slot, and a
// miss costs one new server connection (replacing another workspace's when
// the cache is full). With a budget B and 3 connections per workspace,
// k = B/3 is the number of workspaces tenantpg can serve at full per-database
// concurrency and k = B the number it can keep one connection each for; the
// driver's measured hit rate lies between those models, not on either.
//
// Both run in O(1) (LRU) or O(log k) (MIN) per operation on the interleaved
// global trace, so a trace of millions of operations takes well under a
// second.

// simulateLRU returns the hit rate of an LRU cache of k slots over seq,
// whose values are workspace indexes in [0, n).
func simulateLRU(seq []int32, n, k int) float64 {
	if len(seq) == 0 || k < 1 {
		return 0
	}
	// A doubly linked list threaded through arrays indexed by workspace:
	// head is the most recently used, tail the victim.
	const none = -1
	prev := make([]int32, n)
	next := make([]int32, n)
	cached := make([]bool, n)
	head, tail := int32(none), int32(none)
	size, hits := 0, 0
	unlink := func(x int32) {
		if prev[x] != none {
			next[prev[x]] = next[x]
		} else {
			head = next[x]
		}
		if next[x] != none {
			prev[next[x]] = prev[x]
		} else {
			tail = prev[x]
		}
	}
	pushFront := func(x int32) {
		prev[x], next[x] = none, head
		if head != none {
			prev[head] = x
		}
		head = x
		if tail == none {
			tail = x
		}
	}
	for _, ws := range seq {
		if cached[ws] {
			hits++
			unlink(ws)
			pushFront(ws)
			continue
		}
		if size == k {
			victim := tail
			unlink(victim)
			cached[victim] = false
		} else {
			size++
		}
		cached[ws] = true
		pushFront(ws)
	}
	return float64(hits) / float64(len(seq))
}

// simulateBelady returns the hit rate of Belady's optimal replacement with k
// slots over seq. The next use of every position is precomputed in one
// backward pass; the cached workspaces sit in a max-heap keyed by their next
// use, with each workspace's heap position tracked so that a hit updates its
// key in place (O(log k)) instead of leaving stale entries behind.
func simulateBelady(seq []int32, n, k int) float64 {
	if len(seq) == 0 || k < 1 {
		return 0
	}
	never := int32(len(seq)) // later than any position: not used again
	nextUse := make([]int32, len(seq))
	last := make([]int32, n)
	for i := range last {
		last[i] = never
	}
	for i := len(seq) - 1; i >= 0; i-- {
		nextUse[i] = last[seq[i]]
		last[seq[i]] = int32(i)
	}

	h := idxHeap{key: make([]int32, n), pos: make([]int32, n)}
	for i := range h.pos {
		h.pos[i] = -1
	}
	hits := 0
	for i, ws := range seq {
		if h.pos[ws] >= 0 {
			hits++
			h.update(ws, nextUse[i])
			continue
		}
		if len(h.items) == k {
			h.popMax()
		}
		h.push(ws, nextUse[i])
	}
	return float64(hits) / float64(len(seq))
}

// idxHeap is a binary max-heap of workspaces keyed by next use, with each
// workspace's index in items kept in pos (-1: not in the heap).
type idxHeap struct {
	items []int32
	key   []int32 // by workspace
	pos   []int32 // by workspace
}

func (h *idxHeap) less(i, j int) bool { return h.key[h.items[i]] > h.key[h.items[j]] }

func (h *idxHeap) swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	h.pos[h.items[i]] = int32(i)
	h.pos[h.items[j]] = int32(j)
}

func (h *idxHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !h.less(i, p) {
			return
		}
		h.swap(i, p)
		i = p
	}
}

func (h *idxHeap) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(h.items) {
			return
		}
		m := l
		if r := l + 1; r < len(h.items) && h.less(r, l) {
			m = r
		}
		if !h.less(m, i) {
			return
		}
		h.swap(i, m)
		i = m
	}
}

func (h *idxHeap) push(ws, key int32) {
	h.key[ws] = key
	h.pos[ws] = int32(len(h.items))
	h.items = append(h.items, ws)
	h.up(len(h.items) - 1)
}

func (h *idxHeap) update(ws, key int32) {
	old := h.key[ws]
	h.key[ws] = key
	if key > old {
		h.up(int(h.pos[ws]))
	} else {
		h.down(int(h.pos[ws]))
	}
}

func (h *idxHeap) popMax() int32 {
	top := h.items[0]
	last := len(h.items) - 1
	h.swap(0, last)
	h.items = h.items[:last]
	h.pos[top] = -1
	if last > 0 {
		h.down(0)
	}
	return top
}

// simResult is one cache model's hit rate on one trace.
type simResult struct {
	workspaces int
	dist       string
	policy     string // "lru", "slru", "wtinylfu" or "belady"
	k          int
	ops        int
	hitRate    float64
}

// simPolicies are the cache models, in the report's column order.
var simPolicies = []struct {
	name, title string
	run         func(seq []int32, n, k int) float64
}{
	{"lru", "LRU", simulateLRU},
	{"slru", "SLRU", simulateSLRU},
	{"wtinylfu", "W-TinyLFU", simulateWTinyLFU},
	{"belady", "Belady", simulateBelady},
}

// simulate runs every policy with k = budget/3 and k = budget on t.
func simulate(t *trace, budget int) []simResult {
	seq := t.global()
	ks := []int{max(1, budget/3), budget}
	if ks[0] == ks[1] {
		ks = ks[1:]
	}
	var out []simResult
	for _, k := range ks {
		for _, p := range simPolicies {
			out = append(out, simResult{workspaces: t.workspaces, dist: t.dist, policy: p.name, k: k, ops: len(seq), hitRate: p.run(seq, t.workspaces, k)})
		}
	}
	return out
}
