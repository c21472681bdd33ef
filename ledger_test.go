package tenantpg

import (
	"math/rand"
	"testing"

	"github.com/stretchr/testify/require"
)

// The ledger on its own, without a budget or a server: a token's life
// through its states, the shared counts with reservations, and the rules
// that say whether a pool may take a token.

// TestLedgerTokenLife walks one token of a pool with a reservation of one
// and one of a pool without through every state, checking the counts and
// the shared sums at each step.
func TestLedgerTokenLife(t *testing.T) {
	l := ledger{max: 3, limit: 3}
	var a, b tokenCounts
	l.reserve(&a, 1)
	check := func(step string) {
		t.Helper()
		require.NoError(t, l.check([]*tokenCounts{&a, &b}), step)
	}
	check("reserved")
	require.True(t, l.room(&b), "2 shared tokens free")

	l.take(&a) // within a's reservation
	check("a takes")
	require.Equal(t, 0, l.sharedInUse)
	require.Equal(t, 1, a.dialing)
	l.dialed(&a)
	l.park(&a)
	check("a dialed and parked")
	require.Equal(t, 1, a.idle)

	l.take(&b)
	l.take(&b) // both shared tokens
	check("b takes two")
	require.Equal(t, 2, l.sharedInUse)
	require.Equal(t, 2, l.sharedLive)
	require.False(t, l.room(&b), "the budget is full")
	require.Equal(t, 3, l.peakOpen)

	l.dialed(&b)
	l.close(&b, backendBusy) // closing: still counts, no longer lives
	check("b closes one")
	require.Equal(t, 3, l.open)
	require.Equal(t, 2, l.sharedInUse)
	require.Equal(t, 1, l.sharedLive)
	require.False(t, l.room(&b), "a closing backend still holds its token")

	l.give(&b, backendClosing)
	check("b's token back")
	require.Equal(t, 1, l.sharedInUse)
	require.True(t, l.room(&b))

	l.give(&b, backendDialing) // a grant never dialed
	check("b's other token back")
	require.Zero(t, l.sharedInUse)
	require.Zero(t, b.open)

	l.reuse(&a)
	l.close(&a, backendBusy)
	l.give(&a, backendClosing)
	check("a's token back")
	require.Zero(t, l.open)
	require.Equal(t, 3, l.peakOpen, "the peak stays")
	require.Equal(t, 1, l.unusedReserved(), "a's reservation, unused")
	l.unreserve(&a)
	check("a forgotten")
	require.Zero(t, l.reserved)
}

// TestLedgerRoomAndOver: a reservation keeps tokens for its pool alone; a
// lowered limit puts pools over it, the shared ones first.
func TestLedgerRoomAndOver(t *testing.T) {
	l := ledger{max: 4, limit: 4}
	var sys, app tokenCounts
	l.reserve(&sys, 2)
	l.take(&app)
	l.take(&app)
	require.False(t, l.room(&app), "the rest is reserved")
	require.True(t, l.room(&sys))
	require.False(t, l.over(&app, 2))

	l.limit = 3 // lowered: one shared token beyond what is left
	require.True(t, l.sharedOver())
	require.True(t, l.over(&app, 2), "app holds shared tokens while the shared ones are over")
	require.False(t, l.over(&sys, 2), "sys holds none")
	require.True(t, l.room(&sys), "its reservation, while the server holds fewer than the limit")
	l.take(&sys)
	require.False(t, l.room(&sys), "at the limit, reservation or not")
	require.True(t, l.sharedOver())
	require.False(t, l.over(&sys, 2), "within its reservation")
	require.True(t, l.over(&app, 1), "over its cap")
	require.NoError(t, l.check([]*tokenCounts{&sys, &app}))

	// A token whose backend is closing still counts on the server: sys's
	// second reserved token waits for it to return.
	l.limit = 3
	l.dialed(&app)
	l.close(&app, backendBusy)
	require.Equal(t, 3, l.open)
	require.False(t, l.room(&sys), "3 open, one closing, on a limit of 3")
	l.give(&app, backendClosing)
	require.True(t, l.room(&sys))
	require.NoError(t, l.check([]*tokenCounts{&sys, &app}))
}

// TestLedgerRandomLives runs random token lives on three pools and checks
// the ledger against the sums of their counts after every move.
func TestLedgerRandomLives(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	l := ledger{max: 8, limit: 8}
	pools := make([]*tokenCounts, 3)
	for i := range pools {
		pools[i] = &tokenCounts{}
	}
	l.reserve(pools[0], 2)
	l.reserve(pools[1], 1)
	for i := 0; i < 10000; i++ {
		p := pools[r.Intn(len(pools))]
		switch op := r.Intn(8); {
		case op == 0 && p.open < 4 && l.open < l.limit:
			l.take(p)
		case op == 1 && p.dialing > 0:
			l.dialed(p)
		case op == 2 && p.inUse > 0:
			l.park(p)
		case op == 3 && p.idle > 0:
			l.reuse(p)
		case op == 4 && p.dialing > 0:
			l.close(p, backendDialing)
		case op == 5 && p.inUse > 0:
			l.close(p, backendBusy)
		case op == 6 && p.idle > 0:
			l.close(p, backendIdle)
		case op == 7 && p.closing > 0:
			l.give(p, backendClosing)
		}
		require.NoError(t, l.check(pools), "after move %d", i)
	}
}
