package tenantpg

import "time"

// snapshot is the budget's state copied under the lock, for Stats and the
// metrics, which never take the lock themselves.
type snapshot struct {
	limit, reserved, open, inUse, idle, dialing, closing, waiting, peakOpen int
	longestUse                                                              time.Duration
	dials, waitCount, timeouts, exhausted, handoffs, leaks, collections     uint64
	waitDuration, dialTime                                                  time.Duration
	evictions                                                               [numReasons]uint64
	dialErrors                                                              [numDialErrorKinds]uint64
	dbs                                                                     []dbSnapshot
	servers                                                                 []serverSnapshot
}

type serverSnapshot struct {
	srv                                                                       *server // for its metric attributes, which are not guarded by mu
	label                                                                     string
	limit, reserved, open, inUse, idle, dialing, closing, peakOpen, dialSlots int
	down                                                                      bool
	since                                                                     time.Time
	downFor                                                                   time.Duration
	waiting                                                                   int
	outages, failed                                                           uint64
	lastErr                                                                   string
	fleet                                                                     *FleetStats
}

type dbSnapshot struct {
	db                                                 *backendPool // for its metric attributes, which are not guarded by mu
	workspace, name                                    string
	open, inUse, idle, dialing, closing, cap, reserved int
	waiting                                            int
	lastUsed                                           time.Time
	evictions                                          uint64
	longestUse, useTime                                time.Duration
}
