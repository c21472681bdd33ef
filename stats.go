package tenantpg

import (
	"encoding/json"
	"net/http"
	"sort"
	"time"
)

// Stats is a snapshot of a driver's budget. Unlike (*sql.DB).Stats, it counts
// what the server sees: a connection the driver evicted is gone from Open at
// once, while database/sql counts it until it next touches it. It holds no
// DSN, user or password (servers are named by host and port; only a fleet's
// squatters, sessions of another role, are named by role and pid), and
// marshals to JSON with camelCase names.
type Stats struct {
	// Limit is the sum of the budgets of the servers in use (each gets
	// MaxConnections unless ServerMaxConnections names it), MaxConnections
	// before any database is opened. The counters that follow are sums over
	// the servers too; Servers has each one's.
	Limit    int `json:"limit"`
	Reserved int `json:"reserved"` // connections reserved by databases for themselves
	Open     int `json:"open"`     // tokens held: InUse + Idle + Dialing + Closing
	InUse    int `json:"inUse"`
	Idle     int `json:"idle"`
	Dialing  int `json:"dialing"`
	Closing  int `json:"closing"`  // closed, waiting for the server to end the backend
	Waiting  int `json:"waiting"`  // callers waiting for a backend or a token
	PeakOpen int `json:"peakOpen"` // the most tokens held at once, across servers
	// LongestUse is how long the connection checked out longest ago has
	// been held by its caller, across all databases: minutes here mean a
	// *sql.Conn, Rows or Tx that is never closed.
	LongestUse time.Duration `json:"longestUseNs"`

	Dials uint64 `json:"dials"`
	// Handoffs counts backends passed from one caller straight to the next
	// caller of the same database at check-in.
	Handoffs uint64 `json:"handoffs"`
	// DialTime is the moving average of a dial's duration, which the
	// driver weighs against waiting for a busy backend.
	DialTime     time.Duration     `json:"dialTimeNs"`
	WaitCount    uint64            `json:"waitCount"`
	WaitDuration time.Duration     `json:"waitDurationNs"`
	Timeouts     uint64            `json:"timeouts"`
	Evictions    map[string]uint64 `json:"evictions"`  // by reason: lru, handoff, idle_timeout, lifetime, budget_shrink, broken, driver_closed, server_full, unused, abandoned
	DialErrors   map[string]uint64 `json:"dialErrors"` // rejected (server out of slots, SQLSTATE 53300), unavailable (server down), other
	// ActiveDatabases is len(Databases): the pools holding or reserving
	// connections (two pools of one database count twice).
	ActiveDatabases int `json:"activeDatabases"`
	// SuspectedLeaks counts connections held longer than
	// Config.LeakThreshold, each once (zero while it is not set).
	SuspectedLeaks uint64 `json:"suspectedLeaks"`
	// Collections counts the garbage collections the driver triggered
	// (at most one a second) because callers waited while handles of
	// closed *sql.DBs were still open; see Evictions["abandoned"].
	Collections uint64 `json:"collections"`

	// Databases lists every pool holding or reserving connections,
	// ordered by workspace, database and pool.
	Databases []DatabaseStats `json:"databases"`

	// Servers lists the servers of the databases in use, down ones first,
	// then by host:port.
	Servers []ServerStats `json:"servers"`
}

// ServerStats describes one server's budget and circuit in a Stats
// snapshot. While a server is down its callers wait for one probe dial at
// a time to succeed.
type ServerStats struct {
	Server   string `json:"server"` // host:port
	Limit    int    `json:"limit"`  // its budget
	Reserved int    `json:"reserved"`
	Open     int    `json:"open"` // tokens of its budget held: InUse + Idle + Dialing + Closing
	InUse    int    `json:"inUse"`
	Idle     int    `json:"idle"`
	Dialing  int    `json:"dialing"`
	Closing  int    `json:"closing"`
	PeakOpen int    `json:"peakOpen"`
	// DialSlots is how many dials (or evictions for one) the pacing lets
	// start at once now.
	DialSlots int           `json:"dialSlots"`
	Waiting   int           `json:"waiting"` // callers waiting on its databases: for a backend, a token, or it to come back
	Down      bool          `json:"down"`
	DownSince time.Time     `json:"downSince"`   // zero while up
	DownFor   time.Duration `json:"downForNs"`   // zero while up
	LastError string        `json:"lastError"`   // what the last dial found, while down: no DSN, user or password
	Outages   uint64        `json:"outages"`     // times it went down
	Failed    uint64        `json:"failedWaits"` // callers whose wait ended while it was down (ErrServerDown)
	// Fleet is its fleet budget's coordination, nil without one
	// (Config.FleetMaxConnections). Limit is then the share leased.
	Fleet *FleetStats `json:"fleet,omitempty"`
}

// DatabaseStats describes one pool in a Stats snapshot: a *sql.DB, a Pool or
// one workspace of a routed DB. Two pools of one database (two *sql.DBs
// opened with its DSN) are two entries, told apart by Pool.
type DatabaseStats struct {
	Workspace string `json:"workspace"`
	Database  string `json:"database"`
	// Pool identifies the pool within the driver, for as long as it
	// lives; a pool opened later gets another.
	Pool      uint64    `json:"pool"`
	Open      int       `json:"open"`
	InUse     int       `json:"inUse"`
	Idle      int       `json:"idle"`
	Dialing   int       `json:"dialing"`
	Closing   int       `json:"closing"`
	Waiting   int       `json:"waiting"` // callers waiting for a backend of this database
	Cap       int       `json:"cap"`
	Reserved  int       `json:"reserved"`
	LastUsed  time.Time `json:"lastUsed"`
	Evictions uint64    `json:"evictions"`
	// LongestUse is how long this database's connection checked out
	// longest ago has been held; zero when none is checked out.
	LongestUse time.Duration `json:"longestUseNs"`
	// UseTime is the moving average of how long a caller holds a backend
	// of this database, which decides whether waiting callers dial
	// another.
	UseTime time.Duration `json:"useTimeNs"`
}

// Stats returns a snapshot of the driver's budget and of every database that
// holds or reserves connections.
func (d *Driver) Stats() Stats {
	b := d.b.snapshot()
	c := &b.counters
	s := Stats{
		Limit: b.limit, Reserved: b.reserved, Open: b.open, InUse: b.inUse, Idle: b.idle,
		Dialing: b.dialing, Closing: b.closing, Waiting: b.waiting, PeakOpen: b.peakOpen, LongestUse: b.longestUse,
		Dials: c.dials, Handoffs: c.handoffs, DialTime: b.dialTime,
		WaitCount: c.waitCount, WaitDuration: c.waitDuration, Timeouts: c.timeouts,
		SuspectedLeaks: c.leaks, Collections: c.collections,
		Evictions: make(map[string]uint64, numReasons-1),
		DialErrors: map[string]uint64{"rejected": c.dialErrors[dialRejected], "unavailable": c.dialErrors[dialDown],
			"other": c.dialErrors[dialOther]},
	}
	for _, x := range b.servers {
		s.Servers = append(s.Servers, ServerStats{Server: x.label, Limit: x.limit, Reserved: x.reserved, Open: x.open,
			InUse: x.inUse, Idle: x.idle, Dialing: x.dialing, Closing: x.closing, PeakOpen: x.peakOpen, DialSlots: x.dialSlots,
			Waiting: x.waiting, Down: x.down, DownSince: x.since, DownFor: x.downFor,
			LastError: x.lastErr, Outages: x.outages, Failed: x.failed, Fleet: x.fleet})
	}
	sort.Slice(s.Servers, func(i, j int) bool {
		if s.Servers[i].Down != s.Servers[j].Down {
			return s.Servers[i].Down
		}
		return s.Servers[i].Server < s.Servers[j].Server
	})
	for r := reasonNone + 1; r < numReasons; r++ {
		s.Evictions[reasonNames[r]] = c.evictions[r]
	}
	for _, db := range b.dbs {
		if db.open == 0 && db.reserved == 0 {
			continue // callers waiting only; Waiting counts them
		}
		s.Databases = append(s.Databases, DatabaseStats{
			Workspace: db.workspace, Database: db.name, Pool: db.db.id,
			Open: db.open, InUse: db.inUse, Idle: db.idle, Dialing: db.dialing, Closing: db.closing,
			Waiting: db.waiting, Cap: db.cap, Reserved: db.reserved, LastUsed: db.lastUsed, Evictions: db.evictions,
			LongestUse: db.longestUse, UseTime: db.useTime,
		})
	}
	s.ActiveDatabases = len(s.Databases)
	sort.Slice(s.Databases, func(i, j int) bool {
		if s.Databases[i].Workspace != s.Databases[j].Workspace {
			return s.Databases[i].Workspace < s.Databases[j].Workspace
		}
		if s.Databases[i].Database != s.Databases[j].Database {
			return s.Databases[i].Database < s.Databases[j].Database
		}
		return s.Databases[i].Pool < s.Databases[j].Pool
	})
	return s
}

// StatsHandler serves d.Stats() as JSON on GET (and HEAD); any other method
// gets 405 Method Not Allowed. It has no authentication of its own: the
// snapshot names workspaces and shows their load, so mount it behind the
// application's own authentication.
func StatsHandler(d *Driver) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		body, err := json.Marshal(d.Stats())
		if err != nil {
			http.Error(w, "cannot encode stats", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		if r.Method == http.MethodGet {
			_, _ = w.Write(body)
		}
	})
}
