package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tenantpg/tenantpg"
)

// childFlag, as the first argument, makes the program a replica: the
// parent re-executes itself with it and a JSON childSpec. It is not a
// registered flag, so -help does not list it.
const childFlag = "-fleet-replica"

// envChildDSN carries the routed DSN to the replica: the environment, not
// argv, so that the password never shows in ps.
const envChildDSN = "FLEETBENCH_DSN"

// childSpec is everything a replica needs: its schedule is computed from
// the common start and phase length, so no IPC beyond stdout is needed.
type childSpec struct {
	Replica, Replicas    int
	Start                int64 // Unix nanoseconds, the same for every replica of a mode
	Phase, Duration      time.Duration
	OpTimeout            time.Duration
	Workers, ColdWorkers int
	Workspaces           int // ids label(0)…label(W-1), in Zipf rank order
	Rows                 int
	Seed                 int64
	ZipfS                float64
	// Virtual, when > 0, makes this one process run the workers of
	// replicas 0..Virtual-1 (mode single): the same workers, seeds and
	// schedule as that many replica processes, through one driver. Its
	// lines carry the virtual replica's index; the driver's counters and
	// state are in replica 0's lines only.
	Virtual int
	// Partitioned (mode partitioned) gives each virtual replica its own
	// routed *sql.DB: its own pools, as a replica process has, under the
	// one budget and its one recency order, with no coordination.
	Partitioned bool
	// ShareEvery is how often a fleet replica samples its driver's Stats to
	// time share moves (0: never); ShareTarget is the share (backends) the
	// hot replica is timed to reach from the start of its phase.
	ShareEvery  time.Duration
	ShareTarget int
}

// hot reports whether the replica is the hot one at t.
func (s childSpec) hot(t time.Time) bool {
	return s.phaseAt(t)%s.Replicas == s.Replica
}

func (s childSpec) phaseAt(t time.Time) int {
	return int(t.Sub(time.Unix(0, s.Start)) / s.Phase)
}

// line is one JSON line of a replica's stdout: one per second of the run,
// and a final one that says the replica finished.
type line struct {
	Replica  int              `json:"replica"`
	Sec      int              `json:"sec"` // seconds since the common start
	Hot      bool             `json:"hot"`
	Ops      int64            `json:"ops"`
	Errs     map[string]int64 `json:"errs,omitempty"`
	P50      float64          `json:"p50_ms"`
	P99      float64          `json:"p99_ms"`
	Hist     map[int]int64    `json:"hist,omitempty"` // latency buckets (histBucket), for the parent's percentiles
	FirstErr string           `json:"first_err,omitempty"`

	// The driver's counters so far, in every line: a killed replica's
	// last line still counts.
	Dials    uint64 `json:"dials"`
	Rejected uint64 `json:"rejected"` // dials the server refused with 53300 (the driver retries them)
	// The driver's state at the end of the second: connections held,
	// callers waiting, and its fleet share (0 without a fleet budget).
	Open    int `json:"open"`
	Waiting int `json:"waiting"`
	Share   int `json:"share"`
	// Dialing, Closing and DialSlots are the driver's backends being dialed
	// and being closed, and its servers' dial slots (pacing), at the end of
	// the second; DialsIn is how many dials it started in the second.
	Dialing   int     `json:"dialing"`
	Closing   int     `json:"closing"`
	DialSlots int     `json:"dialSlots"`
	DialsIn   uint64  `json:"dialsIn"`
	DialMs    float64 `json:"dialMs"` // the driver's moving average of a dial's time
	// Yielded counts the backends it closed for other replicas so far.
	Yielded uint64 `json:"yielded"`
	// RoundTrips counts the statements of its coordination sessions so far
	// (FleetStats.RoundTrips).
	RoundTrips uint64 `json:"roundTrips,omitempty"`

	// Moves are the share moves that ended in this second (fleet mode,
	// ShareEvery > 0): each from the first sample with a caller queued at
	// the limit (Waiting > 0 and Open ≥ Limit) to the first with more slots
	// leased (FleetStats.Leased grew). Cleared counts the queues that
	// emptied without a lease. Reached is, in the second it happened, when
	// the share first reached ShareTarget in a hot phase.
	Moves   []move `json:"moves,omitempty"`
	Cleared int    `json:"cleared,omitempty"`
	Reached []int  `json:"reached,omitempty"` // ms since the common start

	Final bool `json:"final,omitempty"`
	// DBs, in the final line, is how many routed *sql.DB the process's
	// workers read through: 1, or in mode partitioned one per replica.
	DBs int `json:"dbs,omitempty"`
}

// move is one share move, in milliseconds since the common start.
type move struct {
	Q int `json:"q"` // first sample with a caller queued at the limit
	L int `json:"l"` // first sample with a newly leased slot
}

// histBucket maps a latency to a bucket, 20 per decade of microseconds
// (12% wide), and bucketValue back to its middle.
func histBucket(d time.Duration) int {
	us := max(float64(d)/float64(time.Microsecond), 1)
	return int(math.Floor(math.Log10(us) * 20))
}

func bucketValue(b int) time.Duration {
	return time.Duration(math.Pow(10, (float64(b)+0.5)/20) * float64(time.Microsecond))
}

type second struct {
	ops      int64
	errs     map[string]int64
	lat      []time.Duration
	firstErr string
	moves    []move
	cleared  int
	reached  []int
}

// recorder collects outcomes by the second in which they ended.
type recorder struct {
	mu        sync.Mutex
	start     time.Time
	secs      map[int]*second
	lastDials uint64 // the driver's Dials at the last line (flush's goroutine only)
}

// secLocked returns the second at t, created if need be.
func (r *recorder) secLocked(t time.Time) *second {
	sec := int(t.Sub(r.start) / time.Second)
	s := r.secs[sec]
	if s == nil {
		s = &second{errs: map[string]int64{}}
		r.secs[sec] = s
	}
	return s
}

// event records the sampler's findings at t (see line.Moves).
func (r *recorder) event(t time.Time, f func(s *second)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r.secLocked(t))
}

func (r *recorder) add(end time.Time, d time.Duration, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.secLocked(end)
	if err != nil {
		s.errs[errKind(err)]++
		if s.firstErr == "" {
			s.firstErr = err.Error()
		}
		return
	}
	s.ops++
	s.lat = append(s.lat, d)
}

// flush writes the lines of every second before upTo. Only the process's
// own replica (not a virtual one of mode single) reports the driver's state.
func (r *recorder) flush(spec childSpec, upTo int, enc *json.Encoder, driver bool) {
	r.mu.Lock()
	var secs []int
	for k := range r.secs {
		if k < upTo {
			secs = append(secs, k)
		}
	}
	slices.Sort(secs)
	taken := make([]*second, len(secs))
	for i, k := range secs {
		taken[i] = r.secs[k]
		delete(r.secs, k)
	}
	r.mu.Unlock()
	for i, k := range secs {
		s := taken[i]
		l := line{Replica: spec.Replica, Sec: k, Ops: s.ops, FirstErr: s.firstErr,
			Hot:   spec.hot(r.start.Add(time.Duration(k) * time.Second)),
			Moves: s.moves, Cleared: s.cleared, Reached: s.reached}
		if driver {
			st := tenantpg.Default().Stats()
			l.Dials, l.Rejected, l.Open, l.Waiting, l.Yielded = st.Dials, st.DialErrors["rejected"], st.Open, st.Waiting, st.Evictions["fleet"]
			l.Dialing, l.Closing, l.DialsIn = st.Dialing, st.Closing, st.Dials-r.lastDials
			r.lastDials = st.Dials
			l.DialMs = ms(st.DialTime)
			for _, sv := range st.Servers {
				l.DialSlots += sv.DialSlots
				if sv.Fleet != nil {
					l.Share += sv.Fleet.Share
					l.RoundTrips += sv.Fleet.RoundTrips
				}
			}
		}
		if len(s.errs) > 0 {
			l.Errs = s.errs
		}
		if len(s.lat) > 0 {
			slices.Sort(s.lat)
			l.P50 = ms(s.lat[len(s.lat)/2])
			l.P99 = ms(s.lat[min(len(s.lat)-1, len(s.lat)*99/100)])
			l.Hist = map[int]int64{}
			for _, d := range s.lat {
				l.Hist[histBucket(d)]++
			}
		}
		_ = enc.Encode(l)
	}
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

// errKind names the caller-visible error kinds the report counts.
func errKind(err error) string {
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, tenantpg.ErrBudgetExhausted):
		return "exhausted"
	case errors.As(err, &pgErr) && pgErr.Code == "53300":
		return "53300"
	case errors.Is(err, tenantpg.ErrServerDown):
		return "server_down"
	case errors.Is(err, context.DeadlineExceeded):
		return "deadline"
	}
	return "other"
}

// childMain runs one replica: closed-loop workers doing primary-key reads
// on Zipf-chosen workspaces through one routed *sql.DB, all of them while
// the replica is hot, ColdWorkers otherwise. The driver is configured only
// by the TENANTPG_* environment the parent set.
func childMain(arg string, stdout, stderr io.Writer) int {
	var spec childSpec
	if err := json.Unmarshal([]byte(arg), &spec); err != nil {
		fmt.Fprintln(stderr, "bad replica spec:", err)
		return 2
	}
	db, err := tenantpg.OpenDB(os.Getenv(envChildDSN))
	if err != nil {
		fmt.Fprintln(stderr, "open:", err)
		return 1
	}
	defer db.Close()

	start := time.Unix(0, spec.Start)
	end := start.Add(spec.Duration)
	enc := json.NewEncoder(stdout)

	// One replica, or in mode single every replica's workers in this one
	// process, each with its own recorder.
	specs := []childSpec{spec}
	if spec.Virtual > 0 {
		specs = specs[:0]
		for v := 0; v < spec.Virtual; v++ {
			vs := spec
			vs.Replica = v
			specs = append(specs, vs)
		}
	}
	recs := make([]*recorder, len(specs))
	dbs := 1
	var wg sync.WaitGroup
	for i, vs := range specs {
		recs[i] = &recorder{start: start, secs: map[int]*second{}}
		vdb := db
		if spec.Partitioned && i > 0 {
			if vdb, err = tenantpg.OpenDB(os.Getenv(envChildDSN)); err != nil {
				fmt.Fprintln(stderr, "open:", err)
				return 1
			}
			defer vdb.Close()
			dbs++
		}
		for j := 0; j < vs.Workers; j++ {
			wg.Add(1)
			go func(rec *recorder, vs childSpec, j int) {
				defer wg.Done()
				worker(vdb, vs, j, start, end, rec)
			}(recs[i], vs, j)
		}
	}
	samplerDone := make(chan struct{})
	if spec.ShareEvery > 0 && spec.Virtual == 0 {
		go func() {
			defer close(samplerDone)
			sampleShare(spec, start, end, recs[0])
		}()
	} else {
		close(samplerDone)
	}
	flushDone := make(chan struct{})
	flushAll := func(upTo int) {
		for i, vs := range specs {
			recs[i].flush(vs, upTo, enc, i == 0)
		}
	}
	go func() {
		defer close(flushDone)
		for sec := 1; !start.Add(time.Duration(sec-1) * time.Second).After(end); sec++ {
			time.Sleep(time.Until(start.Add(time.Duration(sec) * time.Second)))
			flushAll(sec)
		}
	}()
	wg.Wait()
	<-samplerDone
	<-flushDone
	flushAll(math.MaxInt) // operations that ended after the run (their deadline)
	st := tenantpg.Default().Stats()
	for i, vs := range specs {
		l := line{Replica: vs.Replica, Final: true}
		if i == 0 {
			l.Dials, l.Rejected, l.DBs = st.Dials, st.DialErrors["rejected"], dbs
			for _, sv := range st.Servers {
				if sv.Fleet != nil {
					l.RoundTrips += sv.Fleet.RoundTrips
				}
			}
		}
		_ = enc.Encode(l)
	}
	return 0
}

// sampleShare times share moves in a fleet replica: every ShareEvery it
// reads the driver's Stats of the fleet's server. A move starts at the
// first sample with a caller queued at the limit (Waiting > 0, Open ≥
// Limit) after one without, and ends at the first sample whose
// FleetStats.Leased is higher than at its start; a queue that empties
// first counts as cleared. It also notes, once per hot phase, when the
// share first reaches ShareTarget. Sampling costs one Stats call (the
// budget's lock, a copy of its numbers) per interval.
func sampleShare(spec childSpec, start, end time.Time, rec *recorder) {
	t := time.NewTicker(spec.ShareEvery)
	defer t.Stop()
	var (
		queuedBefore bool
		inMove       bool
		q            time.Time
		leased0      uint64
		reachedPhase = -1
	)
	msOf := func(at time.Time) int { return int(at.Sub(start) / time.Millisecond) }
	for now := range t.C {
		if now.After(end) {
			return
		}
		if now.Before(start) {
			continue
		}
		var fs *tenantpg.FleetStats
		var sv tenantpg.ServerStats
		for _, x := range tenantpg.Default().Stats().Servers {
			if x.Fleet != nil {
				sv, fs = x, x.Fleet
			}
		}
		if fs == nil {
			continue
		}
		queued := sv.Waiting > 0 && sv.Open >= sv.Limit
		switch {
		case inMove && fs.Leased > leased0:
			m := move{Q: msOf(q), L: msOf(now)}
			rec.event(now, func(s *second) { s.moves = append(s.moves, m) })
			inMove = false
		case inMove && !queued:
			rec.event(now, func(s *second) { s.cleared++ })
			inMove = false
		case !inMove && queued && !queuedBefore:
			inMove, q, leased0 = true, now, fs.Leased
		}
		queuedBefore = queued
		if p := spec.phaseAt(now); spec.hot(now) && p != reachedPhase && spec.ShareTarget > 0 && fs.Share >= spec.ShareTarget {
			reachedPhase = p
			ms := msOf(now)
			rec.event(now, func(s *second) { s.reached = append(s.reached, ms) })
		}
	}
}

// worker is one closed-loop caller. Its random streams depend only on the
// seed, the replica and the worker, so every mode replays the same sequence
// of workspaces and keys.
func worker(db *sql.DB, spec childSpec, j int, start, end time.Time, rec *recorder) {
	r := rand.New(rand.NewSource(spec.Seed*1_000_003 + int64(spec.Replica)*1_000 + int64(j)))
	z := rand.NewZipf(r, spec.ZipfS, 1, uint64(spec.Workspaces-1))
	time.Sleep(time.Until(start))
	var v string
	for {
		now := time.Now()
		if !now.Before(end) {
			return
		}
		if !spec.hot(now) && j >= spec.ColdWorkers {
			// Idle until the next phase, when this replica may be hot.
			next := start.Add(time.Duration(spec.phaseAt(now)+1) * spec.Phase)
			if next.After(end) {
				next = end
			}
			time.Sleep(time.Until(next))
			continue
		}
		ws := label(int(z.Uint64()))
		ctx, cancel := context.WithTimeout(tenantpg.WithWorkspace(context.Background(), ws), spec.OpTimeout)
		t := time.Now()
		err := db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = $1", 1+r.Intn(spec.Rows)).Scan(&v)
		done := time.Now()
		cancel()
		rec.add(done, done.Sub(t), err)
	}
}
