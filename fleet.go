package tenantpg

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The fleet: several processes (replicas of a service) that use tenantpg
// against one PostgreSQL server share one cap, the fleet budget F (the
// role's CONNECTION LIMIT). They coordinate through the server itself: each
// process keeps one coordination session per server, to the coordination
// database, and leases slots as session-level advisory locks on it. The
// server frees every lease of a process the moment its session ends, so a
// killed process gives its slots back without anyone noticing it died.
//
// Slots. The slots are the advisory locks (k1, s) for s in 1..F-1, k1 an
// int4 hashed from the fleet name and the role (fleetKey). One unit of F is
// never leased: it is the door, through which a joining process's
// coordination session connects before it holds any lease. Once connected,
// the session leases one slot for itself (slots[0]); every further slot is
// a backend the host may open. So in steady state the members' sessions and
// backends together stay within F-1, and with a joiner in the door within
// F. A second process that joins at the same moment is refused by the
// server (SQLSTATE 53300) and retries with backoff and jitter.
//
// Leasing. Slots are leased in one round trip per batch (leaseSQL): the
// candidate slots are tried from a random offset, so that members do not
// collide, skipping the ones the session holds already (advisory locks are
// re-entrant within a session: locking one twice would need two unlocks),
// and the scan stops after the wanted number of successes. A member leases
// at least fleetBatch(F) slots at a time, so a dial costs at most one
// amortised round trip, and gives spare slots back only beyond a hysteresis
// of two batches, or at once when another member is short.
//
// Order. Acquiring: lock first, then fleetSetHeld(higher). Releasing:
// fleetSetHeld(lower) first, and unlock only if the host accepted (its open
// backends fit). The host is never told it may hold more backends than the
// slots locked.
//
// Demand. Every member LISTENs on the fleet's channel (fleetChannel). A
// member whose need is not met by the free slots says so with a
// notification, "need <pid> <n>", and retries leasing, from every
// fleetRetryMin doubling to fleetRetryMax while the shortage lasts (a killed
// member's slots are free the moment its session ends, and are found within
// fleetRetryMax). A member that hears another's need asks its host to yield
// (fleetYield), down to the fair share, and gives back what its host no
// longer needs in its next round.
//
// Members and fair share: the distinct sessions of the fleet's role holding
// this fleet's locks (pg_locks joined with pg_stat_activity), plus sessions
// of the role heard asking for slots recently (a joiner in the door holds
// none), plus this one. fair = (F-1)/members - 1 backends, at least 1: each
// member's session takes one slot of its share.
//
// Neighbours. Advisory locks and NOTIFY are open to every session that can
// connect to the coordination database, whatever its role. A session of
// another role may therefore hold the fleet's slots (a squatter) or send
// "need" notifications. Neither counts: members are the role's sessions,
// and a notification is heard only from a session of the role (the
// sender's role is looked up once per member count). Slots a squatter holds
// are lost to the fleet, and a process could be left with no share at all;
// so while another role holds any, the host is given a floor of one
// backend beyond its leases (fleetFloor). The role's CONNECTION LIMIT, which
// a squatter of another role does not use, still caps the server, and a
// refused dial is retried as without a fleet. Each squatter is reported
// once in the log, and in FleetStats while it holds slots.
//
// Logins. The coordination session logs in with the first DSN registered
// for the server; every later DSN of the role with another password is kept
// as a candidate (offer), and a login the server refuses (SQLSTATE class
// 28) moves to the next candidate at once, so that one DSN with a wrong
// password does not keep the fleet away.
//
// Loss: if the session fails, every lease went with it. The host is told
// (fleetLost) and falls back to the last fair share; the coordinator
// reconnects with backoff (probeBackoff, as the circuit's probes) and
// leases again, and tells the host what it holds (fleetSetHeld) once its
// slots cover the host's need or at least the fallback share.
//
// One session does everything: LISTEN and the lease queries. Between
// rounds the coordinator waits in WaitForNotification with a context that
// poke or a timer cancels. pgconn's default context watcher sets a past
// deadline on the socket; the read returns a timeout, which pgconn does not
// treat as fatal, and the deadline is cleared when the wait returns, so the
// session stays usable (TestFleetWaitCancelKeepsSession checks it).

// fleetHost is the budget's side of one server's fleet coordination. Its
// methods take the budget's lock; the coordinator calls them from its own
// goroutine and never holds its own mutex while calling them.
type fleetHost interface {
	// fleetNeed returns how many slots the process wants leased for backends now
	// (its open backends plus callers waiting to dial, capped by its local limit,
	// minus what it is yielding to other members). The coordination session's own
	// slot is not included.
	fleetNeed() int
	// fleetSetHeld tells the host it may hold n backends. Lowering succeeds only
	// if the host's open backends fit in n; it returns false otherwise (the
	// coordinator keeps those slots and tries again later).
	fleetSetHeld(n int) bool
	// fleetYield asks the host to give up to n slots to other members; fair is the
	// fair share of backends per member, below which a host with demand keeps its slots.
	fleetYield(n, fair int)
	// fleetLost says the coordination session (and every lease with it) is gone:
	// the host falls back to n backends, a safe local share, until fleetSetHeld is called again.
	fleetLost(n int)
	// fleetFloor sets how many backends the host may hold whatever its
	// leases: 1 while sessions of another role hold the fleet's slots, else 0.
	fleetFloor(n int)
}

// fleetSettings configure one server's fleet coordination.
type fleetSettings struct {
	max      int    // F, the fleet budget: every member's sessions, coordination sessions included
	name     string // fleet name, default "tenantpg"
	database string // coordination database, default "postgres"

	// refresh is how often the member count is refreshed (default
	// fleetRefresh); tests lengthen it to count round trips exactly.
	refresh time.Duration
}

// fleetSettingsOf returns cfg's fleet settings.
func fleetSettingsOf(cfg Config) fleetSettings {
	return fleetSettings{max: cfg.FleetMaxConnections, name: cfg.FleetName, database: cfg.FleetDatabase}
}

// FleetStats describe one server's fleet coordination.
type FleetStats struct {
	Connected  bool   `json:"connected"`  // the coordination session is up
	Members    int    `json:"members"`    // processes in the fleet, as last counted (this one included)
	Share      int    `json:"share"`      // slots held for backends (the session's own slot not included)
	FairShare  int    `json:"fairShare"`  // fair share of backends per member
	Leased     uint64 `json:"leased"`     // slots leased, cumulative
	Released   uint64 `json:"released"`   // slots released, cumulative (those lost with a session included)
	RoundTrips uint64 `json:"roundTrips"` // statements run on the coordination session
	Failures   uint64 `json:"failures"`   // failed connections and sessions
	LastError  string `json:"lastError"`  // what the last failure was, without DSN details
	// Squatters are the sessions of other roles holding the fleet's slots,
	// as last counted. While there are any, the process may hold one
	// connection beyond its share; see the README on the fleet database.
	Squatters []FleetSquatter `json:"squatters"`
}

// FleetSquatter is a session of another role holding slots of the fleet.
type FleetSquatter struct {
	Role  string `json:"role"`  // "" for a prepared transaction
	PID   uint32 `json:"pid"`   // its backend; 0 for a prepared transaction (see pg_prepared_xacts)
	Slots int    `json:"slots"` // slots it holds
}

const (
	fleetDefaultName     = "tenantpg"
	fleetDefaultDatabase = "postgres"

	fleetRefresh  = time.Second            // member count refresh
	fleetRetryMin = 100 * time.Millisecond // lease retry and need notification while short
	fleetRetryMax = time.Second
	fleetHeard    = 2 * time.Second // a need heard from another member counts this long
	fleetQueryMax = 5 * time.Second // bound on one statement of the session
	fleetDialMax  = 10 * time.Second

	// fleetSquatterForget is how long a squatter must be gone before it is
	// logged again if it comes back: long enough that one that lets go of
	// its slots now and then is one line, short enough to bound the memory.
	fleetSquatterForget = 10 * time.Minute
)

// fleetKey is the first advisory-lock key of the fleet's slots: FNV-1a of
// the fleet name and role, as an int4.
func fleetKey(name, role string) int32 {
	h := fnv.New32a()
	h.Write([]byte("tenantpg fleet\x00" + name + "\x00" + role))
	return int32(h.Sum32())
}

// fleetChannel is the fleet's LISTEN/NOTIFY channel: a lower-case
// identifier, safe to use unquoted.
func fleetChannel(k1 int32) string { return fmt.Sprintf("tenantpg_fleet_%08x", uint32(k1)) }

// fleetBatch is how many slots a member leases at least in one round trip.
func fleetBatch(f int) int { return max(1, f/16) }

// fleetFair is the fair share of backends per member.
func fleetFair(f, members int) int {
	return max(1, (f-1)/max(1, members)-1)
}

// leaseSQL tries the slots from offset $1 round the $2 slots, skipping those
// in $3, and stops after $5 successes: the try-lock sits in the filter of
// the function scan directly under the LIMIT (no sort in between), so it is
// evaluated only for the rows the LIMIT pulls. The CASE makes the
// membership test run first: a slot held already must never be locked a
// second time.
const leaseSQL = `SELECT s FROM (SELECT ((($1::int4 + i) % $2::int4) + 1)::int4 AS s FROM generate_series(0, $2::int4 - 1) AS i) AS x
WHERE CASE WHEN s = ANY($3::int4[]) THEN false ELSE pg_try_advisory_lock($4::int4, s) END
LIMIT $5::int4`

// releaseSQL unlocks the slots $2 and counts those that were held.
const releaseSQL = `SELECT (count(*) FILTER (WHERE pg_advisory_unlock($1::int4, s)))::int4 FROM unnest($2::int4[]) AS s`

// membersSQL lists the holders of slots of the fleet $1 (classid is the
// key's unsigned value; objsubid 2 marks the two-int4 form) in this
// database (advisory locks are per database): pid, whether it is a session
// of this session's role, its role, and how many slots it holds. A lock of
// a prepared transaction has no pid and is never the role's (the fleet
// takes none at transaction level). A pid missing from pg_stat_activity is
// a session that ended between the two views' snapshots: it is left out,
// rather than reported as a squatter of no role.
const membersSQL = `SELECT coalesce(l.pid, 0)::int4,
coalesce(a.usesysid = (SELECT oid FROM pg_roles WHERE rolname = session_user), false),
coalesce(a.usename::text, ''), count(*)::int4
FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = $1::int8::oid AND l.objsubid = 2 AND l.granted
AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
AND (l.pid IS NULL OR a.pid IS NOT NULL)
GROUP BY 1, 2, 3`

// roleSQL says whether the session $1 is one of this session's role: a
// notification is heard only from those.
const roleSQL = `SELECT coalesce(bool_or(usesysid = (SELECT oid FROM pg_roles WHERE rolname = session_user)), false)
FROM pg_stat_activity WHERE pid = $1::int4`

// fleetCoordinator coordinates one server's slots with the other members of
// the fleet, for one host.
type fleetCoordinator struct {
	max     int
	batch   int
	refresh time.Duration
	k1      int32
	channel string
	host    fleetHost
	clk     clock
	log     *slog.Logger
	name    string // the fleet's, for the session's application_name
	dbName  string // the coordination database
	label   string // host:port, for the log

	runCtx    context.Context // cancelled when close gives up waiting
	runCancel context.CancelFunc
	stop      chan struct{} // closed by close
	stopOnce  sync.Once
	done      chan struct{} // closed when run returns

	mu         sync.Mutex         // guards the fields below, up to the blank line
	poked      bool               // guarded by mu
	waitCancel context.CancelFunc // guarded by mu; the current wait's, while it waits
	st         FleetStats         // guarded by mu
	sessionPID uint32             // guarded by mu; the session's backend, 0 while down
	// cfgs are the session's configs (coordination database, no tracer),
	// one per password the role's DSNs registered, in order. Guarded by mu.
	cfgs []*pgx.ConnConfig

	// The rest belongs to the run goroutine.
	conn         *pgx.Conn
	pid          uint32
	slots        []int32 // slots[0] is the session's own
	granted      int     // what the host was last told it may hold; -1: not told since start or loss
	lostSafe     int     // what the host fell back to
	everUp       bool
	fair         int
	holders      map[uint32]bool      // sessions holding slots, as last counted
	heard        map[uint32]time.Time // members heard asking for slots, when
	othersWant   time.Time            // until when another member is short
	refreshAt    time.Time            // next member count
	short        bool                 // the last round could not cover the need
	retry        time.Duration        // pause before the next attempt while short
	retryAt      time.Time            // no attempt before, while short
	lastNeed     int
	connFailures int
	cfgIdx       int                         // the candidate config the session logs in with
	refusedRun   int                         // logins refused in a row, candidates tried since the last success
	squatted     bool                        // sessions of other roles hold slots, as last counted
	floor        int                         // what fleetFloor last told the host
	fleetPIDs    map[uint32]bool             // senders of notifications looked up since the last count: of the role or not
	squatters    map[fleetSquatter]time.Time // logged squatters, when last seen
}

// fleetSquatter identifies a squatter for the log: a pid reused by another
// role is another squatter.
type fleetSquatter struct {
	pid  uint32
	role string
}

// startFleet starts coordinating for host, through a coordination session
// to s.database on the server of connCfg, as its user. s.max below 2 leaves
// no slot to lease and is raised to 2 (the caller validates the setting).
func startFleet(connCfg *pgx.ConnConfig, s fleetSettings, host fleetHost, clk clock, log *slog.Logger) *fleetCoordinator {
	if s.name == "" {
		s.name = fleetDefaultName
	}
	if s.database == "" {
		s.database = fleetDefaultDatabase
	}
	if s.max < 2 {
		s.max = 2
	}
	if s.refresh <= 0 {
		s.refresh = fleetRefresh
	}
	if clk == nil {
		clk = realClock{}
	}
	k1 := fleetKey(s.name, connCfg.User)
	c := &fleetCoordinator{
		max: s.max, batch: fleetBatch(s.max), refresh: s.refresh,
		label: net.JoinHostPort(connCfg.Host, strconv.Itoa(int(connCfg.Port))), dbName: s.database, name: s.name,
		k1: k1, channel: fleetChannel(k1), host: host, clk: clk, log: log,
		stop: make(chan struct{}), done: make(chan struct{}),
		granted: -1, fair: 1, retry: fleetRetryMin,
		holders: map[uint32]bool{}, heard: map[uint32]time.Time{},
		fleetPIDs: map[uint32]bool{}, squatters: map[fleetSquatter]time.Time{},
	}
	c.cfgs = []*pgx.ConnConfig{c.sessionConfig(connCfg)}
	c.st.Members, c.st.FairShare = 1, 1
	c.runCtx, c.runCancel = context.WithCancel(context.Background())
	go c.run()
	return c
}

// sessionConfig derives the coordination session's config from a DSN's.
func (c *fleetCoordinator) sessionConfig(connCfg *pgx.ConnConfig) *pgx.ConnConfig {
	cfg := connCfg.Copy()
	cfg.Database = c.dbName
	cfg.Tracer = nil
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	// Named for the operator reading pg_stat_activity: the application's
	// own name first, when its DSN sets one, so its sessions group together.
	app := "tenantpg fleet " + c.name
	if own := cfg.RuntimeParams["application_name"]; own != "" {
		app = own + " (" + app + ")"
	}
	cfg.RuntimeParams["application_name"] = app
	if cfg.ConnectTimeout <= 0 || cfg.ConnectTimeout > fleetDialMax {
		cfg.ConnectTimeout = fleetDialMax
	}
	return cfg
}

// offer adds the config of another DSN of the fleet's role as a candidate
// for the session's login, unless one with its password is there already:
// the DSNs of one role and server differ mostly in their databases, and a
// refused login is most often a wrong password, so one candidate per
// password keeps the list short however many databases register (two DSNs
// that differ only in TLS settings or a client certificate are one
// candidate). The host calls it as it registers the DSN, before anything
// else may touch connCfg.
func (c *fleetCoordinator) offer(connCfg *pgx.ConnConfig) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, have := range c.cfgs {
		if have.Password == connCfg.Password {
			return
		}
	}
	c.cfgs = append(c.cfgs, c.sessionConfig(connCfg))
}

// poke says the host's need may have changed. It never blocks: it only
// cuts the coordinator's wait short.
func (c *fleetCoordinator) poke() {
	c.mu.Lock()
	c.poked = true
	cancel := c.waitCancel
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// close stops coordinating: every slot is unlocked and the session closed.
// If ctx ends first, the session is cut (the server then frees the slots
// itself) and close returns ctx's error once the goroutine has ended.
// Calling it again waits for the same end.
func (c *fleetCoordinator) close(ctx context.Context) error {
	c.stopOnce.Do(func() { close(c.stop) })
	c.poke()
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		c.runCancel()
		<-c.done
		return ctx.Err()
	}
}

// stats returns a snapshot of the coordination's state.
func (c *fleetCoordinator) stats() FleetStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	st.Squatters = slices.Clone(st.Squatters)
	return st
}

// backendPID is the coordination session's backend process id, 0 while
// it is down.
func (c *fleetCoordinator) backendPID() uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sessionPID
}

func (c *fleetCoordinator) stopping() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// sleep pauses for d on the clock; false if close was called meanwhile.
func (c *fleetCoordinator) sleep(d time.Duration) bool {
	ch := make(chan struct{})
	t := c.clk.AfterFunc(d, func() { close(ch) })
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-c.stop:
		return false
	}
}

func (c *fleetCoordinator) logf(level slog.Level, msg string, attrs ...slog.Attr) {
	if c.log != nil {
		c.log.LogAttrs(context.Background(), level, msg, attrs...)
	}
}

// run connects, coordinates until the session fails, and starts again,
// until close.
func (c *fleetCoordinator) run() {
	defer close(c.done)
	defer c.runCancel()
	for !c.stopping() {
		if err := c.connect(); err != nil {
			c.failed(err)
			c.connFailures++
			if !c.everUp && c.connFailures == 1 {
				c.lost() // the host learns it has no lease yet
			}
			if isLoginRefused(err) && c.nextConfig() {
				continue // another DSN's login is untried: no reason to wait
			}
			if !c.sleep(probeBackoff(c.connFailures - 1)) {
				break
			}
			continue
		}
		c.connFailures = 0
		err := c.session()
		if c.stopping() {
			break
		}
		c.drop()
		c.failed(err)
		c.lost()
		if !c.sleep(probeBackoff(0)) {
			break
		}
	}
	c.drain()
}

// isLoginRefused reports whether the server refused the login itself
// (SQLSTATE class 28: a wrong password, no pg_hba.conf entry, a role that
// may not log in), which another DSN's credentials may pass.
func isLoginRefused(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && strings.HasPrefix(pe.Code, "28")
}

// nextConfig moves the login to the next candidate config after a refusal,
// and reports whether that one is still untried since the last session.
func (c *fleetCoordinator) nextConfig() bool {
	c.mu.Lock()
	n := len(c.cfgs)
	c.mu.Unlock()
	c.cfgIdx = (c.cfgIdx + 1) % n
	c.refusedRun++
	if c.refusedRun < n {
		return true
	}
	c.refusedRun = 0 // every one refused: back off, then go round again
	return false
}

// connect opens the coordination session and LISTENs.
func (c *fleetCoordinator) connect() error {
	ctx, cancel := context.WithTimeout(c.runCtx, fleetDialMax)
	defer cancel()
	c.mu.Lock()
	cfg := c.cfgs[c.cfgIdx]
	c.mu.Unlock()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	c.refusedRun = 0
	c.conn, c.pid = conn, conn.PgConn().PID()
	if err := c.exec("LISTEN " + c.channel); err != nil {
		c.drop()
		return err
	}
	c.everUp = true
	c.retry = fleetRetryMin
	c.short = false
	c.refreshAt = time.Time{}
	c.mu.Lock()
	c.st.Connected, c.sessionPID = true, c.pid
	c.mu.Unlock()
	c.logf(slog.LevelInfo, "tenantpg: fleet session connected", slog.String("channel", c.channel), slog.Int("pid", int(c.pid)))
	return nil
}

// drop closes the session, whose slots the server frees with it.
func (c *fleetCoordinator) drop() {
	if c.conn == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_ = c.conn.Close(ctx)
	cancel()
	c.conn = nil
	c.mu.Lock()
	c.st.Connected, c.sessionPID = false, 0
	c.st.Released += uint64(len(c.slots))
	c.st.Share = 0
	c.mu.Unlock()
	c.slots = c.slots[:0]
}

// drain ends coordination for close: unlock every slot and close the session.
func (c *fleetCoordinator) drain() {
	if c.conn != nil {
		_ = c.exec("SELECT pg_advisory_unlock_all()")
	}
	c.drop()
}

// failed records a failure, without DSN details.
func (c *fleetCoordinator) failed(err error) {
	if err == nil {
		return
	}
	msg := fleetErrorText(err)
	c.mu.Lock()
	c.st.Failures++
	c.st.LastError = msg
	c.mu.Unlock()
	c.logf(slog.LevelWarn, "tenantpg: fleet coordination failed", slog.String("error", msg))
}

// errSlotsNotHeld: the server unlocked fewer slots than the coordinator
// believed it held, so its count and the server's disagreed.
var errSlotsNotHeld = errors.New("tenantpg: fleet: slots released were not held")

// fleetErrorText describes err without pgx's description of the dial
// (which names the user and the database) nor anything of the DSN: the
// server's own answer, the network's, or the coordinator's own error.
func fleetErrorText(err error) string {
	switch {
	case errors.Is(err, errSlotsNotHeld):
		return err.Error()
	case isContextError(err):
		return "timeout"
	}
	return downCause(err).Error()
}

// lost tells the host every lease is gone.
func (c *fleetCoordinator) lost() {
	safe := 1
	if c.everUp {
		safe = c.fair
	}
	c.granted, c.lostSafe = -1, safe
	c.host.fleetLost(safe)
}

// exec runs one statement on the session.
func (c *fleetCoordinator) exec(sql string, args ...any) error {
	ctx, cancel := context.WithTimeout(c.runCtx, fleetQueryMax)
	defer cancel()
	c.tick()
	_, err := c.conn.Exec(ctx, sql, args...)
	return err
}

func (c *fleetCoordinator) tick() {
	c.mu.Lock()
	c.st.RoundTrips++
	c.mu.Unlock()
}
