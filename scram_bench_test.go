//go:build unix

package tenantpg

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// BenchmarkScramProof is the client's SCRAM work for one login, in memory:
// the client-first-message, the proof, and the check of the server's
// signature. cache-off derives the keys every time, as pgx does; cache-on
// finds them. Each iteration also plays the server's part of the last step
// (one HMAC), about a microsecond.
func BenchmarkScramProof(b *testing.B) {
	salt := []byte("0123456789abcdef")
	saltB64 := base64.StdEncoding.EncodeToString(salt)
	server, err := deriveScramKeys(testPassword, salt, 4096)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	run := func(b *testing.B, cache func() *scramCache) {
		b.ReportAllocs()
		for b.Loop() {
			cv := newScramConv("n,,", nil)
			_ = cv.clientFirst()
			serverFirst := "r=" + cv.nonce + "server-nonce,s=" + saltB64 + ",i=4096"
			final, err := cv.clientFinal(ctx, cache(), testPassword, []byte(serverFirst))
			if err != nil {
				b.Fatal(err)
			}
			m := hmac.New(sha256.New, server.serverKey[:])
			m.Write([]byte(cv.first + "," + serverFirst + ","))
			m.Write(final[:bytes.LastIndex(final, []byte(",p="))])
			if err := cv.verify(base64.StdEncoding.AppendEncode([]byte("v="), m.Sum(nil))); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("cache-off", func(b *testing.B) { run(b, newScramCache) })
	b.Run("cache-on", func(b *testing.B) {
		c := newScramCache()
		run(b, func() *scramCache { return c })
	})
}

// BenchmarkScramDial dials the test server (scram-sha-256, 4096
// iterations, no TLS) and closes the connection, with pgx's own exchange
// (cache-off) and through the key cache (cache-on, warmed by one dial
// first). cpu-µs/dial is this process's user and system CPU per dial: the
// client's cost, the server's fork and authentication being another
// process's. Run it with a fixed count, e.g. -benchtime=300x.
func BenchmarkScramDial(b *testing.B) {
	e := newEnv(b, 1, Config{})
	e.setRoleLimit(-1)
	for _, mode := range []string{"cache-off", "cache-on"} {
		b.Run(mode, func(b *testing.B) {
			cfg, err := pgconn.ParseConfig(e.dsn(0))
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			dial := func() {
				pc, err := pgconn.ConnectConfig(ctx, cfg)
				if err != nil {
					b.Fatal(err)
				}
				_ = pc.Close(ctx)
			}
			if mode == "cache-on" {
				cfg.AfterNetConnect = newScramCache().hook(nil)
				dial()
			}
			before := processCPU(b)
			n := 0
			for b.Loop() {
				dial()
				n++
			}
			b.ReportMetric(float64((processCPU(b)-before).Microseconds())/float64(n), "cpu-µs/dial")
		})
	}
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
