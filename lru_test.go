package tenantpg

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The eviction policy on its own, without a budget or a server: pools with
// idle backends in an slru, and the victims it chooses.

// lruPool is a pool for the policy alone: open tokens, of which idle are
// idle backends, the last checked in at at, and reserved of its own.
func lruPool(name string, open, idle, reserved int, at time.Time) *backendPool {
	p := &backendPool{workspace: name}
	p.tokens = tokenCounts{reserved: reserved, open: open, idle: idle, inUse: open - idle}
	for i := range idle {
		p.idleBackends.pushFront(&backend{db: p, state: backendIdle, idleSince: at.Add(time.Duration(i))})
	}
	return p
}

// order lists the pools of r in eviction order: probation, then protected,
// least recently used first.
func order(r *slru) []string {
	var out []string
	r.each(func(p *backendPool) { out = append(out, p.workspace) })
	return out
}

// TestSLRUOrder: touched pools are evicted least recently used first; a
// pool reused is protected and evicted after every pool on probation; the
// protected segment beyond its share demotes its least recently used pool.
func TestSLRUOrder(t *testing.T) {
	var r slru
	a, b, c := lruPool("a", 1, 1, 0, smEpoch), lruPool("b", 1, 1, 0, smEpoch), lruPool("c", 1, 1, 0, smEpoch)
	for _, p := range []*backendPool{a, b, c} {
		r.touch(p)
	}
	require.Equal(t, []string{"a", "b", "c"}, order(&r))
	require.Same(t, a, r.victim().db)
	r.touch(a)
	require.Equal(t, []string{"b", "c", "a"}, order(&r), "a touched: most recently used")

	r.reused(b, 5) // a hit: b is protected
	require.True(t, b.protected)
	require.Equal(t, []string{"c", "a", "b"}, order(&r), "probation first")
	require.Equal(t, 1, r.protectedOpen)

	// The protected segment's share of a limit of 2 is 1 token: promoting c
	// demotes b, the least recently used protected pool with idle backends.
	r.reused(c, 2)
	require.True(t, c.protected)
	require.False(t, b.protected, "demoted")
	require.Equal(t, []string{"a", "b", "c"}, order(&r), "b back on probation as its most recently used")
	require.Equal(t, 1, r.protectedOpen)

	r.remove(a) // its last idle backend taken
	require.Equal(t, []string{"b", "c"}, order(&r))

	// A protected pool that gives its last token back leaves the cache.
	c.tokens = tokenCounts{}
	r.gave(c)
	require.False(t, c.protected)
	require.Zero(t, r.protectedOpen)
}

// TestSLRUVictims: a victim frees a shared token, so a pool within its
// reservation is skipped; a grower takes only a spare backend idle for
// spareIdleAfter, a miss a spare one first and a last one failing that.
func TestSLRUVictims(t *testing.T) {
	now := smEpoch.Add(time.Hour)
	var r slru
	reserved := lruPool("reserved", 1, 1, 1, smEpoch) // its backend is within its reservation
	last := lruPool("last", 1, 1, 0, smEpoch)         // its only backend
	spare := lruPool("spare", 2, 1, 0, now)           // one idle, one busy: the idle one is spare, just checked in
	for _, p := range []*backendPool{reserved, last, spare} {
		r.touch(p)
	}
	require.Same(t, last, r.victim().db, "the least recently used pool holding a shared token")

	grower := lruPool("grower", 1, 0, 0, now)
	miss := lruPool("miss", 0, 0, 0, now)
	require.Nil(t, r.victimFor(grower, now), "growth takes no last backend, and the spare one is too young")
	require.Same(t, spare, r.victimFor(grower, now.Add(spareIdleAfter)).db, "old enough")
	require.Same(t, spare, r.victimFor(miss, now).db, "a miss takes a spare backend first, however young")

	r.remove(spare)
	spare.idleBackends = list[backend, backendInList]{}
	require.Same(t, last, r.victimFor(miss, now).db, "no spare left: a miss takes a last backend")
	require.Nil(t, r.victimFor(grower, now.Add(spareIdleAfter)))

	// A pool that drops to one live backend leaves the spare list.
	two := lruPool("two", 2, 2, 0, smEpoch)
	r.touch(two)
	require.Same(t, two, r.victimFor(grower, now).db)
	two.tokens.closing = 1 // one of them closing
	r.liveDropped(two)
	require.Nil(t, r.victimFor(grower, now), "its other backend is its last")
}
