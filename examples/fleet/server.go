package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// password is the app role's password: distinctive, so the test can check
// that it appears nowhere in the output. No DSN is ever printed.
const password = "fleet-Pw-7Hq2xZ-never-printed"

// logLinePrefix makes every server log line unique (millisecond time and
// backend pid) and carries the SQLSTATE (%e), so that the refusals can be
// counted from pgtest's 50-line log tail by polling it (logWatch).
const logLinePrefix = "%m [%p] %e %u@%d: "

// world is the server side: a throwaway PostgreSQL (or the one -dsn names),
// a role whose CONNECTION LIMIT is the fleet budget F (the cap under test:
// the server itself refuses the F+1st session with 53300), and workspace
// databases copied from a template holding the kv table.
type world struct {
	srv       *pgtest.Server
	role      string
	labels    []string
	routedDSN string // database name prefix + {workspace}; holds the password: never printed
	external  bool   // not our server: no log to count refusals from
	connLimit int    // the role's CONNECTION LIMIT now
}

// setConnLimit changes the role's CONNECTION LIMIT, for a mode run with
// another budget (mode@B).
func (w *world) setConnLimit(ctx context.Context, n int) error {
	if _, err := w.srv.Admin().ExecContext(ctx, fmt.Sprintf("ALTER ROLE %s CONNECTION LIMIT %d", pgtest.QuoteIdent(w.role), n)); err != nil {
		return fmt.Errorf("role's connection limit: %w", err)
	}
	w.connLimit = n
	return nil
}

func startWorld(ctx context.Context, o options, log io.Writer) (*world, error) {
	if o.dsn != "" {
		os.Setenv(pgtest.EnvURL, o.dsn)
	}
	w := &world{external: os.Getenv(pgtest.EnvURL) != ""}
	var err error
	// max_connections well above F: the role's limit is the cap under
	// test, and refused dials briefly hold a server slot each.
	w.srv, err = pgtest.Start(pgtest.Options{
		MaxConnections: 2*o.maxBudget() + 30,
		// -c takes the value verbatim: no quotes.
		Settings: map[string]string{"log_line_prefix": logLinePrefix},
	})
	if err != nil {
		return nil, fmt.Errorf("start PostgreSQL: %w", err)
	}
	if w.role, err = w.srv.CreateRole(ctx, "fleet_app", password, o.fleetBudget); err != nil {
		w.stop()
		return nil, err
	}
	w.connLimit = o.fleetBudget
	start := time.Now()
	tmpl, err := w.srv.CreateDatabases(ctx, w.role, "", "fleet_template")
	if err == nil {
		// One template with the table, copied by CREATE DATABASE ... TEMPLATE:
		// cheaper than creating the table in every workspace.
		err = w.srv.Exec(ctx, tmpl[0],
			"CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL)",
			fmt.Sprintf("INSERT INTO kv SELECT g, md5(g::text) FROM generate_series(1, %d) g", o.rows),
			"ALTER TABLE kv OWNER TO "+pgtest.QuoteIdent(w.role),
			"VACUUM ANALYZE kv")
	}
	if err != nil {
		w.stop()
		return nil, fmt.Errorf("template database: %w", err)
	}
	for i := 0; i < o.workspaces; i++ {
		w.labels = append(w.labels, label(i))
	}
	full, err := w.srv.CreateDatabases(ctx, w.role, tmpl[0], w.labels...)
	if err != nil {
		w.stop()
		return nil, err
	}
	warmed := "not warmed (-cold)"
	if !o.cold {
		if err := warm(ctx, w.srv, full); err != nil {
			w.stop()
			return nil, err
		}
		warmed = "each warmed by a first session"
	}
	w.routedDSN = w.srv.URL(w.role, password, w.srv.Prefix+"{workspace}")
	fmt.Fprintf(log, "server ready: role with CONNECTION LIMIT %d, %d workspace databases (%s) in %s\n",
		o.fleetBudget, o.workspaces, warmed, time.Since(start).Round(time.Millisecond))
	return w, nil
}

// warm opens a first session to each database, a few at a time. CREATE
// DATABASE does not copy the relation cache's init file (pg_internal.init),
// so a database's first session builds and writes it: without this the
// first mode of a run would pay that for every database it reads, and the
// modes after it would not (examples/bench measured the same).
func warm(ctx context.Context, srv *pgtest.Server, dbs []string) error {
	sem := make(chan struct{}, 4)
	errs := make(chan error, len(dbs))
	var wg sync.WaitGroup
	for _, db := range dbs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs <- srv.Exec(ctx, db, "SELECT v FROM kv WHERE id = 1")
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return fmt.Errorf("warm: %w", err)
		}
	}
	return nil
}

// label is workspace i's id; its database is the server's prefix + label.
func label(i int) string { return fmt.Sprintf("ws_%05d", i) }

func (w *world) stop() { _ = w.srv.Stop() }

// snapshot is one sample of the role's sessions on the server.
type snapshot struct {
	at    time.Time
	total int            // every session that counts toward the role's CONNECTION LIMIT
	byApp map[string]int // by application_name: replica-<i>, or what the library sets
	coord int            // sessions in the fleet's coordination database
}

// sampler reads pg_stat_activity every interval on one dedicated admin
// connection and keeps every snapshot, analysed after each mode.
type sampler struct {
	mu     sync.Mutex
	snaps  []snapshot
	cancel context.CancelFunc
	done   chan struct{}
}

// sessionsQuery counts what PostgreSQL's CountUserBackends counts toward a
// role's CONNECTION LIMIT: client backends and WAL senders, not background
// workers (parallel workers carry the leader's usename but do not count).
const sessionsQuery = `SELECT coalesce(application_name, ''), coalesce(datname = $2, false), count(*)
FROM pg_stat_activity WHERE usename = $1 AND backend_type IN ('client backend', 'walsender') GROUP BY 1, 2`

func (w *world) sample(interval time.Duration, coordDB string) (*sampler, error) {
	ctx, cancel := context.WithCancel(context.Background())
	conn, err := w.srv.Admin().Conn(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	s := &sampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer conn.Close()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			snap, err := readSessions(ctx, conn, w.role, coordDB)
			if err == nil {
				s.mu.Lock()
				s.snaps = append(s.snaps, snap)
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s, nil
}

func readSessions(ctx context.Context, conn *sql.Conn, role, coordDB string) (snapshot, error) {
	snap := snapshot{byApp: map[string]int{}}
	rows, err := conn.QueryContext(ctx, sessionsQuery, role, coordDB)
	if err != nil {
		return snap, err
	}
	defer rows.Close()
	for rows.Next() {
		var app string
		var coord bool
		var n int
		if err := rows.Scan(&app, &coord, &n); err != nil {
			return snap, err
		}
		snap.total += n
		// A replica's coordination session is named "replica-<i> (tenantpg
		// fleet ...)": it counts as the replica's, as its slot does.
		if i := strings.IndexByte(app, ' '); i > 0 && strings.HasPrefix(app, "replica-") {
			app = app[:i]
		}
		snap.byApp[app] += n
		if coord {
			snap.coord += n
		}
	}
	snap.at = time.Now()
	return snap, rows.Err()
}

// latest returns the newest snapshot (zero if none yet).
func (s *sampler) latest() snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.snaps) == 0 {
		return snapshot{}
	}
	return s.snaps[len(s.snaps)-1]
}

// between returns the snapshots taken in [from, to).
func (s *sampler) between(from, to time.Time) []snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []snapshot
	for _, sn := range s.snaps {
		if !sn.at.Before(from) && sn.at.Before(to) {
			out = append(out, sn)
		}
	}
	return out
}

func (s *sampler) stop() {
	s.cancel()
	<-s.done
}

// logWatch polls pgtest's log tail (its last 50 lines) and timestamps every
// new line with SQLSTATE 53300. Lines are unique thanks to logLinePrefix, so
// a new line is one not in the previous tail. If a whole tail is new, lines
// may have scrolled past between two polls and the count is a lower bound.
type logWatch struct {
	mu      sync.Mutex
	refused []time.Time
	lossy   []time.Time // polls that may have missed lines
	cancel  context.CancelFunc
	done    chan struct{}
}

func (w *world) watchLog(interval time.Duration) *logWatch {
	ctx, cancel := context.WithCancel(context.Background())
	lw := &logWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(lw.done)
		prev := map[string]bool{}
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			lines := strings.Split(w.srv.Log(), "\n")
			now := time.Now()
			cur := make(map[string]bool, len(lines))
			fresh := 0
			lw.mu.Lock()
			for _, l := range lines {
				cur[l] = true
				if l == "" || prev[l] {
					continue
				}
				fresh++
				if strings.Contains(l, "] 53300 ") {
					lw.refused = append(lw.refused, now)
				}
			}
			if len(prev) > 0 && fresh == len(lines) && len(lines) >= 50 {
				lw.lossy = append(lw.lossy, now)
			}
			lw.mu.Unlock()
			prev = cur
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return lw
}

// count returns the refusals seen in [from, to) and whether some may have
// been missed.
func (lw *logWatch) count(from, to time.Time) (n int, lossy bool) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	in := func(t time.Time) bool { return !t.Before(from) && t.Before(to) }
	for _, t := range lw.refused {
		if in(t) {
			n++
		}
	}
	for _, t := range lw.lossy {
		lossy = lossy || in(t)
	}
	return n, lossy
}

func (lw *logWatch) stop() {
	lw.cancel()
	<-lw.done
}
