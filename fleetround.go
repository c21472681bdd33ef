package tenantpg

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// A fleet coordinator's session (fleet.go): rounds of leasing and
// releasing slots for its host's need, counting the members and squatters
// that set the fair share, and hearing the other members' needs between
// rounds.

// session coordinates until the session fails or close is called.
func (c *fleetCoordinator) session() error {
	for !c.stopping() {
		wait, err := c.round()
		if err != nil {
			return err
		}
		if err := c.wait(wait); err != nil {
			return err
		}
	}
	return nil
}

// round does what the host's need and the other members' needs call for,
// and returns how long to wait for news before the next round.
func (c *fleetCoordinator) round() (time.Duration, error) {
	c.mu.Lock()
	c.poked = false
	c.mu.Unlock()
	now := c.clk.Now()
	need := max(0, c.host.fleetNeed())
	if need != c.lastNeed {
		// A new need is tried at once, and asked for again if short.
		c.lastNeed, c.retry, c.retryAt = need, fleetRetryMin, time.Time{}
	}

	counted := false
	if !now.Before(c.refreshAt) {
		if err := c.countMembers(now); err != nil {
			return 0, err
		}
		counted = true
	}

	// Lease: the session's own slot, then the host's need, a batch at least.
	// While short, the lease and the notification wait for the retry
	// time, whatever wakes the session meanwhile: two members that are
	// both short would otherwise wake each other in a loop.
	want := need + 1 - len(c.slots)
	short, tried := false, false
	if want > 0 {
		short = true
		if !c.short || !now.Before(c.retryAt) {
			tried = true
			n := min(max(want, c.batch), c.max-1-len(c.slots))
			got, err := c.lease(n)
			if err != nil {
				return 0, err
			}
			short = got < want
			if short && !counted && !c.squatted {
				// Who holds the rest decides whether the host needs its
				// floor: without a recount a squatter that took the slots
				// since the last one would hold the host at 0 until the next.
				if err := c.countMembers(now); err != nil {
					return 0, err
				}
			}
		}
	}
	share := max(0, len(c.slots)-1)

	// Tell the host what it may hold: raising follows the locks.
	if c.granted < 0 {
		if share >= need || share >= c.lostSafe {
			if c.host.fleetSetHeld(share) {
				c.granted = share
			}
		} else {
			// Connected again but short of the fallback share (the others
			// took the slots meanwhile): the host must hold no more than
			// the locks now cover. Its busy backends above that close as
			// they are checked in.
			c.host.fleetLost(share)
		}
	} else if share > c.granted && c.host.fleetSetHeld(share) {
		c.granted = share
	}

	// Release spare slots: the host lets go first.
	othersWant := now.Before(c.othersWant)
	pending := false
	if c.granted >= 0 && share > need {
		target := -1
		switch {
		case othersWant:
			target = need
		case share-need > 2*c.batch:
			target = need + c.batch
		}
		if target >= 0 && target < share {
			if c.host.fleetSetHeld(target) {
				c.granted = target
				if err := c.release(share - target); err != nil {
					return 0, err
				}
			} else {
				pending = true
			}
		}
	}
	// The floor is lowered only once the host has been told its share (it
	// is raised as soon as a squatter is counted), so that a share and a
	// floor changing in the same round never close a backend in between.
	if !c.squatted && c.floor > 0 {
		c.floor = 0
		c.host.fleetFloor(0)
	}
	c.mu.Lock()
	c.st.Share = max(0, len(c.slots)-1)
	c.mu.Unlock()

	if short {
		if !c.short {
			c.retry = fleetRetryMin
		}
		c.short = true
		if tried {
			if err := c.exec("SELECT pg_notify($1, $2)", c.channel,
				"need "+strconv.FormatUint(uint64(c.pid), 10)+" "+strconv.Itoa(need+1-len(c.slots))); err != nil {
				return 0, err
			}
			d := c.retry
			c.retry = min(2*c.retry, fleetRetryMax)
			c.retryAt = now.Add(d/2 + rand.N(d/2+1))
		}
		return max(c.retryAt.Sub(now), 0), nil
	}
	c.short = false
	wait := max(c.refreshAt.Sub(now), 0)
	if pending && othersWant {
		wait = min(wait, fleetRetryMin)
	}
	return wait, nil
}

// lease leases up to n more slots in one round trip and returns how many.
func (c *fleetCoordinator) lease(n int) (int, error) {
	if n <= 0 {
		return 0, nil
	}
	ctx, cancel := context.WithTimeout(c.runCtx, fleetQueryMax)
	defer cancel()
	c.tick()
	slots := c.max - 1
	rows, err := c.conn.Query(ctx, leaseSQL, rand.N(slots), slots, c.slots, c.k1, n)
	if err != nil {
		return 0, err
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		// Some of the rows may have been locked: the session is dropped,
		// and its locks with it.
		return 0, err
	}
	c.slots = append(c.slots, got...)
	c.mu.Lock()
	c.st.Leased += uint64(len(got))
	c.mu.Unlock()
	return len(got), nil
}

// release unlocks the last n slots (never the session's own).
func (c *fleetCoordinator) release(n int) error {
	n = min(n, len(c.slots)-1)
	if n <= 0 {
		return nil
	}
	free := c.slots[len(c.slots)-n:]
	ctx, cancel := context.WithTimeout(c.runCtx, fleetQueryMax)
	defer cancel()
	c.tick()
	var unlocked int32
	if err := c.conn.QueryRow(ctx, releaseSQL, c.k1, free).Scan(&unlocked); err != nil {
		return err
	}
	c.slots = c.slots[:len(c.slots)-n]
	c.mu.Lock()
	c.st.Released += uint64(n)
	c.mu.Unlock()
	if int(unlocked) != n {
		return fmt.Errorf("%w: %d of %d", errSlotsNotHeld, n-int(unlocked), n)
	}
	return nil
}

// countMembers refreshes the member count and the fair share, and the
// squatters.
func (c *fleetCoordinator) countMembers(now time.Time) error {
	ctx, cancel := context.WithTimeout(c.runCtx, fleetQueryMax)
	defer cancel()
	c.tick()
	rows, err := c.conn.Query(ctx, membersSQL, int64(uint32(c.k1)))
	if err != nil {
		return err
	}
	clear(c.holders)
	var squatters []FleetSquatter
	var pid, n int32
	var own bool
	var role string
	_, err = pgx.ForEachRow(rows, []any{&pid, &own, &role, &n}, func() error {
		if own {
			c.holders[uint32(pid)] = true
		} else {
			squatters = append(squatters, FleetSquatter{Role: role, PID: uint32(pid), Slots: int(n)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	// A sender's role is looked up again after each count: a pid ends and
	// may come back as a session of another role.
	clear(c.fleetPIDs)
	c.refreshAt = now.Add(c.refresh)
	c.setFair(now)
	c.setSquatters(now, squatters)
	return nil
}

// setSquatters records the squatters counted, raises the host's floor if
// there are any, and logs each new one once. The floor comes first: a
// squatter in the stats means the floor holds.
func (c *fleetCoordinator) setSquatters(now time.Time, squatters []FleetSquatter) {
	slices.SortFunc(squatters, func(a, b FleetSquatter) int { return cmp.Compare(a.PID, b.PID) })
	c.squatted = len(squatters) > 0
	if c.squatted && c.floor == 0 {
		c.floor = 1
		c.host.fleetFloor(1)
	}
	c.mu.Lock()
	c.st.Squatters = squatters
	c.mu.Unlock()
	for _, q := range squatters {
		id := fleetSquatter{pid: q.PID, role: q.Role}
		if _, seen := c.squatters[id]; !seen {
			c.logf(slog.LevelWarn, "tenantpg: a session of another role holds slots of the fleet budget; "+
				"this process serves at a floor of one connection until they are free (revoke CONNECT on the fleet database from other roles)",
				slog.String("role", q.Role), slog.Int("pid", int(q.PID)), slog.Int("slots", q.Slots),
				slog.String("server", c.label), slog.String("database", c.dbName))
		}
		c.squatters[id] = now
	}
	for id, at := range c.squatters {
		if now.Sub(at) > fleetSquatterForget {
			delete(c.squatters, id)
		}
	}
}

// setFair recomputes the fair share from the holders, the members heard
// asking recently and this one.
func (c *fleetCoordinator) setFair(now time.Time) {
	members := len(c.holders)
	if !c.holders[c.pid] {
		members++
	}
	for pid, at := range c.heard {
		switch {
		case now.Sub(at) > fleetHeard:
			delete(c.heard, pid)
		case !c.holders[pid]:
			members++
		}
	}
	c.fair = fleetFair(c.max, members)
	c.mu.Lock()
	c.st.Members, c.st.FairShare = members, c.fair
	c.mu.Unlock()
}

// wait waits up to d for a notification, poke or close.
func (c *fleetCoordinator) wait(d time.Duration) error {
	ctx, cancel := context.WithCancel(c.runCtx)
	defer cancel()
	c.mu.Lock()
	if c.poked || c.stopping() {
		c.mu.Unlock()
		return nil
	}
	c.waitCancel = cancel
	c.mu.Unlock()
	t := c.clk.AfterFunc(d, cancel)
	defer t.Stop()
	defer func() {
		c.mu.Lock()
		c.waitCancel = nil
		c.mu.Unlock()
	}()
	for {
		n, err := c.conn.WaitForNotification(ctx)
		if err != nil {
			if ctx.Err() != nil && !c.conn.IsClosed() && c.runCtx.Err() == nil {
				return nil // timer or poke: the session stays usable
			}
			return err
		}
		// This session's own notifications come back to it: they change
		// nothing, and a round for each would repeat the need before the
		// other members could act on it. Those of other roles' sessions
		// are not the fleet's, and must not wake it either.
		want, ok := parseNeed(n.Payload)
		if !ok || n.PID == c.pid {
			continue
		}
		ours, err := c.ofFleet(n.PID)
		if err != nil {
			return err
		}
		if ours {
			c.heardNeed(n.PID, want)
			return nil
		}
	}
}

// parseNeed reads a "need <pid> <n>" payload; the pid in it is the
// sender's word, and the notification's own PID is used instead.
func parseNeed(payload string) (int, bool) {
	f := strings.Fields(payload)
	if len(f) != 3 || f[0] != "need" {
		return 0, false
	}
	want, err := strconv.Atoi(f[2])
	if err != nil || want <= 0 {
		return 0, false
	}
	return want, true
}

// ofFleet reports whether pid is a session of the fleet's role: one
// holding slots as last counted, or one looked up since. The lookup costs a
// round trip per sender and count, however many notifications it sends.
func (c *fleetCoordinator) ofFleet(pid uint32) (bool, error) {
	if c.holders[pid] {
		return true, nil
	}
	if ours, ok := c.fleetPIDs[pid]; ok {
		return ours, nil
	}
	ctx, cancel := context.WithTimeout(c.runCtx, fleetQueryMax)
	defer cancel()
	c.tick()
	var ours bool
	if err := c.conn.QueryRow(ctx, roleSQL, int32(pid)).Scan(&ours); err != nil {
		return false, err
	}
	c.fleetPIDs[pid] = ours
	return ours, nil
}

// heardNeed handles another member's need: the host is asked to yield, and
// the next rounds give back what it no longer needs.
func (c *fleetCoordinator) heardNeed(pid uint32, want int) {
	now := c.clk.Now()
	c.heard[pid] = now
	c.othersWant = now.Add(fleetHeard)
	c.setFair(now)
	c.host.fleetYield(want, c.fair)
}
