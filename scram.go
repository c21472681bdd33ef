package tenantpg

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// SCRAM-SHA-256 with keys derived once. pgx derives the salted password
// (PBKDF2, 4096 HMAC-SHA-256 rounds at PostgreSQL's default) on every dial,
// about 0.7 ms of client CPU; the result depends only on the password, the
// role's salt and the iteration count, so the driver keeps the keys derived
// from it and a later dial computes its proof with a few HMACs.
//
// The seam is pgconn.Config.AfterNetConnect: the connection pgx is handed
// back answers the server's SCRAM request itself, then shows pgx what the
// server sends next (AuthenticationOk, or the server's error) as if no
// exchange had been asked for. Every other method, and every byte after
// authentication, passes through untouched. A dial whose settings make
// pgx's own bookkeeping of the exchange matter (require_auth,
// channel_binding=require) is left to pgx, as are non-ASCII passwords,
// whose SASLprep normalisation is pgx's business.

// ErrScramServerSignature is matched by errors.Is for a dial that failed
// because the server's SCRAM signature did not verify: the server proved
// no knowledge of the role's password verifier, so it is not the server
// the DSN means to reach (an impostor, or a proxy that does not hold the
// verifier).
var ErrScramServerSignature = errors.New("tenantpg: the server's SCRAM signature does not verify: it does not hold the role's password verifier")

const (
	// scramCacheSize bounds the cache: an entry per (password, salt,
	// iteration count), that is per role and password in use, so a few
	// thousand is room to spare; each is about 200 bytes.
	scramCacheSize = 4096
	// scramMaxIterations is the most PBKDF2 rounds a server may ask for,
	// as in pgx: a hostile server must not make a dial spin for minutes.
	scramMaxIterations = 10_000_000
	// scramStartupBuf is the read buffer used until authentication ends;
	// a message before then that does not fit is left to pgx.
	scramStartupBuf = 2048

	scramMech     = "SCRAM-SHA-256"
	scramMechPlus = "SCRAM-SHA-256-PLUS"
)

// scramCache holds the keys derived for each (password, salt, iteration
// count) seen, least recently used first out. Entries are named by an HMAC
// under a key of its own, so neither the map nor anything derived from it
// holds the password or an unkeyed hash of it.
type scramCache struct {
	off     atomic.Bool // Config.DisableScramKeyCache
	nameKey [32]byte

	mu      sync.Mutex
	entries map[[32]byte]*scramEntry
	lru     list[scramEntry, scramInLRU] // most recently used first

	// derivations counts PBKDF2 runs, for the tests.
	derivations atomic.Uint64
}

type scramEntry struct {
	name [32]byte
	// ready is closed once keys or err is set: concurrent first dials of
	// one role wait for the one derivation instead of each running it.
	ready chan struct{}
	keys  scramKeys
	err   error
	link  links[scramEntry]
}

type scramInLRU struct{}

func (scramInLRU) links(e *scramEntry) *links[scramEntry] { return &e.link }

// scramKeys are what SCRAM needs of a password. They let a client log in as
// the role to a server with this salt, so they are as secret as the
// password: String keeps them out of any log line that formats one.
type scramKeys struct {
	clientKey, storedKey, serverKey [sha256.Size]byte
}

func (scramKeys) String() string { return "scramKeys(redacted)" }

func newScramCache() *scramCache {
	c := &scramCache{entries: make(map[[32]byte]*scramEntry)}
	_, _ = rand.Read(c.nameKey[:]) // never fails (crypto/rand panics instead)
	return c
}

// setOff turns the cache off or on; turning it off drops every key.
func (c *scramCache) setOff(off bool) {
	c.off.Store(off)
	if off {
		c.mu.Lock()
		clear(c.entries)
		c.lru = list[scramEntry, scramInLRU]{}
		c.mu.Unlock()
	}
}

func (c *scramCache) name(password string, salt []byte, iterations int) [32]byte {
	m := hmac.New(sha256.New, c.nameKey[:])
	var n [4]byte
	for _, part := range [][]byte{[]byte(password), salt} {
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		m.Write(n[:])
		m.Write(part)
	}
	binary.BigEndian.PutUint32(n[:], uint32(iterations))
	m.Write(n[:])
	var name [32]byte
	m.Sum(name[:0])
	return name
}

// keys returns the keys of (password, salt, iterations), deriving them on a
// miss. A caller that finds another's derivation under way waits for it, or
// for ctx.
func (c *scramCache) keys(ctx context.Context, password string, salt []byte, iterations int) (scramKeys, error) {
	name := c.name(password, salt, iterations)
	c.mu.Lock()
	if e := c.entries[name]; e != nil {
		c.lru.moveToFront(e)
		c.mu.Unlock()
		select {
		case <-e.ready:
			return e.keys, e.err
		case <-ctx.Done():
			return scramKeys{}, ctx.Err()
		}
	}
	e := &scramEntry{name: name, ready: make(chan struct{})}
	c.entries[name] = e
	c.lru.pushFront(e)
	for c.lru.len > scramCacheSize {
		old := c.lru.back
		c.lru.remove(old)
		delete(c.entries, old.name)
	}
	c.mu.Unlock()

	e.keys, e.err = deriveScramKeys(password, salt, iterations)
	c.derivations.Add(1)
	if e.err != nil {
		c.mu.Lock()
		if c.entries[name] == e {
			c.lru.remove(e)
			delete(c.entries, name)
		}
		c.mu.Unlock()
	}
	close(e.ready)
	return e.keys, e.err
}

// deriveScramKeys is RFC 5802's key derivation for SHA-256.
func deriveScramKeys(password string, salt []byte, iterations int) (scramKeys, error) {
	var k scramKeys
	salted, err := pbkdf2.Key(sha256.New, password, salt, iterations, sha256.Size)
	if err != nil {
		return k, err
	}
	hmacInto(k.clientKey[:0], salted, []byte("Client Key"))
	hmacInto(k.serverKey[:0], salted, []byte("Server Key"))
	k.storedKey = sha256.Sum256(k.clientKey[:])
	clear(salted)
	return k, nil
}

func hmacInto(dst, key, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(dst)
}

// hook returns a connector's AfterNetConnect: prev, if the configuration
// had one, then the SCRAM wrapper when the dial can use it.
func (c *scramCache) hook(prev func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error)) func(context.Context, *pgconn.Config, net.Conn) (net.Conn, error) {
	return func(ctx context.Context, cfg *pgconn.Config, conn net.Conn) (net.Conn, error) {
		if prev != nil {
			var err error
			if conn, err = prev(ctx, cfg, conn); err != nil {
				return conn, err
			}
		}
		if !c.usable(cfg) {
			return conn, nil
		}
		return &scramConn{Conn: conn, cache: c, ctx: ctx, cfg: cfg}, nil
	}
}

// usable reports whether a dial with cfg may authenticate through the
// cache. pgx checks require_auth and channel_binding=require against what
// its own exchange did, and would refuse a login it did not see; those
// dials keep pgx's path. So do non-ASCII passwords: PostgreSQL and pgx use
// an ASCII password as it is, while anything else goes through SASLprep,
// where two Unicode tables could disagree. An empty password cannot log in
// with SCRAM at all.
func (c *scramCache) usable(cfg *pgconn.Config) bool {
	if c.off.Load() || cfg.Password == "" || cfg.RequireAuth != "" || cfg.ChannelBinding == "require" {
		return false
	}
	for i := 0; i < len(cfg.Password); i++ {
		if cfg.Password[i] >= 0x80 {
			return false
		}
	}
	return true
}

// scramConn is a dial's connection as pgx sees it. Until authentication
// ends it reads whole messages: an AuthenticationSASL offering SCRAM-SHA-256
// is answered here, with the cache's keys; anything else is handed to pgx
// as the server sent it. After that, reads and writes go straight through.
type scramConn struct {
	net.Conn
	done bool
	out  []byte // bytes for pgx, returned by Read before anything else

	// Set until authentication ends.
	br    *bufio.Reader
	cache *scramCache
	// ctx is the dial's: it bounds a wait for another dial's derivation.
	// The socket's own deadlines are pgx's, set on this connection.
	ctx context.Context
	cfg *pgconn.Config
}

func (s *scramConn) Read(p []byte) (int, error) {
	for {
		if len(s.out) > 0 {
			n := copy(p, s.out)
			s.out = s.out[n:]
			return n, nil
		}
		if s.done {
			return s.Conn.Read(p)
		}
		if err := s.step(); err != nil {
			s.finish(nil)
			s.out = nil
			return 0, err
		}
	}
}

// step reads the server's next message and acts on it.
func (s *scramConn) step() error {
	if s.br == nil {
		s.br = bufio.NewReaderSize(s.Conn, scramStartupBuf)
	}
	msg, err := s.next()
	if err != nil || msg == nil {
		return err
	}
	switch msg[0] {
	case 'R':
		if mechs, ok := s.scramOffer(msg); ok {
			return s.exchange(mechs)
		}
		s.finish(msg) // another method, or AuthenticationOk: pgx's to handle
	case 'E':
		s.finish(msg)
	default:
		// NegotiateProtocolVersion or a notice, before the server asks
		// for a password: pgx's, and the request follows.
		s.out = append(s.out[:0], msg...)
	}
	return nil
}

// next returns the server's next message, whole. A message too large for
// the startup buffer, a malformed one, or a read that failed after part of
// one arrived ends the interception with nothing consumed (nil, nil): pgx
// reads those bytes, and the error after them, and judges them itself.
func (s *scramConn) next() ([]byte, error) {
	hdr, err := s.br.Peek(5)
	if err != nil {
		return s.giveUp(err)
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n < 4 || 1+n > s.br.Size() {
		s.finish(nil)
		return nil, nil
	}
	msg, err := s.br.Peek(1 + n)
	if err != nil {
		return s.giveUp(err)
	}
	_, _ = s.br.Discard(1 + n)
	return msg, nil // valid until the next read of br
}

func (s *scramConn) giveUp(err error) ([]byte, error) {
	if s.br.Buffered() == 0 {
		return nil, err
	}
	s.finish(nil)
	return nil, nil
}

// finish ends the interception: msg (copied) and whatever the buffer read
// ahead are pgx's, in the order the server sent them.
func (s *scramConn) finish(msg []byte) {
	out := slices.Clone(msg)
	if s.br != nil {
		rest, _ := s.br.Peek(s.br.Buffered())
		out = append(out, rest...)
	}
	s.out, s.done, s.br, s.cache, s.ctx, s.cfg = out, true, nil, nil, nil, nil
}

// scramOffer reports whether msg is an AuthenticationSASL that this
// connection answers, and the mechanisms offered. An OAUTHBEARER offer with
// a token provider configured is pgx's, as pgx prefers it.
func (s *scramConn) scramOffer(msg []byte) ([]string, bool) {
	body := msg[5:]
	if len(body) < 4 || binary.BigEndian.Uint32(body) != pgproto3.AuthTypeSASL {
		return nil, false
	}
	var offer pgproto3.AuthenticationSASL
	if offer.Decode(body) != nil || !slices.Contains(offer.AuthMechanisms, scramMech) {
		return nil, false
	}
	if slices.Contains(offer.AuthMechanisms, "OAUTHBEARER") && s.cfg.OAuthTokenProvider != nil {
		return nil, false
	}
	return offer.AuthMechanisms, true
}

// exchange runs SCRAM with the server. The server's error (a wrong
// password: 28P01) reaches pgx as the server sent it; a server signature
// that does not verify fails the dial with ErrScramServerSignature.
func (s *scramConn) exchange(mechs []string) error {
	conv, mech := s.conversation(mechs)
	if err := s.send(&pgproto3.SASLInitialResponse{AuthMechanism: mech, Data: conv.clientFirst()}); err != nil {
		return err
	}
	data, ok, err := s.expect(pgproto3.AuthTypeSASLContinue)
	if !ok {
		return err
	}
	final, err := conv.clientFinal(s.ctx, s.cache, s.cfg.Password, data)
	if err != nil {
		return err
	}
	if err := s.send(&pgproto3.SASLResponse{Data: final}); err != nil {
		return err
	}
	data, ok, err = s.expect(pgproto3.AuthTypeSASLFinal)
	if !ok {
		return err
	}
	if err := conv.verify(data); err != nil {
		return err
	}
	s.finish(nil)
	return nil
}

// conversation picks the mechanism and channel binding as pgx does
// (channel_binding=prefer): over TLS, tls-server-end-point binding when the
// server offers SCRAM-SHA-256-PLUS and the certificate's hash is defined,
// else the "y" flag that lets the server detect a stripped -PLUS offer;
// without TLS, or with channel_binding=disable, no binding.
func (s *scramConn) conversation(mechs []string) (*scramConv, string) {
	tc, isTLS := s.Conn.(*tls.Conn)
	if !isTLS || s.cfg.ChannelBinding == "disable" {
		return newScramConv("n,,", nil), scramMech
	}
	if h := tlsServerEndPoint(tc.ConnectionState()); h != nil && slices.Contains(mechs, scramMechPlus) {
		return newScramConv("p=tls-server-end-point,,", h), scramMechPlus
	}
	return newScramConv("y,,", nil), scramMech
}

func (s *scramConn) send(msg pgproto3.FrontendMessage) error {
	buf, err := msg.Encode(nil)
	if err != nil {
		return err
	}
	_, err = s.Conn.Write(buf)
	return err
}

// expect reads the next SASL step, of type authType, and returns its data;
// ok is false when the interception ended instead: on an ErrorResponse (a
// wrong password: 28P01), which is pgx's to report, or as next ends it.
func (s *scramConn) expect(authType uint32) (data []byte, ok bool, err error) {
	msg, err := s.next()
	if err != nil || msg == nil {
		return nil, false, err
	}
	if msg[0] == 'E' {
		s.finish(msg)
		return nil, false, nil
	}
	body := msg[5:]
	if msg[0] != 'R' || len(body) < 4 || binary.BigEndian.Uint32(body) != authType {
		return nil, false, fmt.Errorf("tenantpg: SCRAM exchange: unexpected message %q from the server", msg[0])
	}
	return slices.Clone(body[4:]), true, nil
}

// tlsServerEndPoint is RFC 5929's tls-server-end-point channel binding
// data: the server certificate's hash, by the hash of its signature
// algorithm, SHA-256 for MD5 and SHA-1; nil where RFC 5929 defines none.
func tlsServerEndPoint(cs tls.ConnectionState) []byte {
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	cert := cs.PeerCertificates[0]
	var h crypto.Hash
	switch cert.SignatureAlgorithm {
	case x509.MD5WithRSA, x509.SHA1WithRSA, x509.ECDSAWithSHA1,
		x509.SHA256WithRSA, x509.SHA256WithRSAPSS, x509.ECDSAWithSHA256:
		h = crypto.SHA256
	case x509.SHA384WithRSA, x509.SHA384WithRSAPSS, x509.ECDSAWithSHA384:
		h = crypto.SHA384
	case x509.SHA512WithRSA, x509.SHA512WithRSAPSS, x509.ECDSAWithSHA512:
		h = crypto.SHA512
	default:
		return nil
	}
	d := h.New()
	d.Write(cert.Raw)
	return d.Sum(nil)
}

// scramConv is the client side of one SCRAM-SHA-256 exchange (RFC 5802,
// RFC 7677). PostgreSQL ignores the SCRAM user name (the startup message
// names the role), so it is sent empty, as libpq does.
type scramConv struct {
	gs2       string // the GS2 header: channel-binding flag, no authzid
	cbData    []byte // tls-server-end-point data, with the "p" flag
	nonce     string
	first     string // client-first-message-bare
	serverSig [sha256.Size]byte
}

func newScramConv(gs2 string, cbData []byte) *scramConv {
	var raw [18]byte
	_, _ = rand.Read(raw[:])
	nonce := base64.RawStdEncoding.EncodeToString(raw[:])
	return &scramConv{gs2: gs2, cbData: cbData, nonce: nonce, first: "n=,r=" + nonce}
}

func (cv *scramConv) clientFirst() []byte { return []byte(cv.gs2 + cv.first) }

// clientFinal parses the server-first-message and returns the
// client-final-message, its proof made with the cache's keys.
func (cv *scramConv) clientFinal(ctx context.Context, cache *scramCache, password string, serverFirst []byte) ([]byte, error) {
	nonce, salt, iterations, err := parseServerFirst(serverFirst)
	if err != nil {
		return nil, err
	}
	if len(nonce) <= len(cv.nonce) || !bytes.HasPrefix(nonce, []byte(cv.nonce)) {
		return nil, errors.New("tenantpg: SCRAM server-first-message: the server's nonce does not extend the client's")
	}
	keys, err := cache.keys(ctx, password, salt, iterations)
	if err != nil {
		return nil, err
	}
	cbind := append([]byte(cv.gs2), cv.cbData...)
	final := make([]byte, 0, 160)
	final = append(final, "c="...)
	final = base64.StdEncoding.AppendEncode(final, cbind)
	final = append(final, ",r="...)
	final = append(final, nonce...)

	authMsg := make([]byte, 0, len(cv.first)+len(serverFirst)+len(final)+2)
	authMsg = append(authMsg, cv.first...)
	authMsg = append(authMsg, ',')
	authMsg = append(authMsg, serverFirst...)
	authMsg = append(authMsg, ',')
	authMsg = append(authMsg, final...)

	var proof [sha256.Size]byte
	hmacInto(proof[:0], keys.storedKey[:], authMsg)
	for i := range proof {
		proof[i] ^= keys.clientKey[i]
	}
	hmacInto(cv.serverSig[:0], keys.serverKey[:], authMsg)
	final = append(final, ",p="...)
	return base64.StdEncoding.AppendEncode(final, proof[:]), nil
}

// verify checks the server-final-message's signature: the server proves it
// holds the role's verifier, on every dial, cached keys or not.
func (cv *scramConv) verify(serverFinal []byte) error {
	if e, ok := bytes.CutPrefix(serverFinal, []byte("e=")); ok {
		return fmt.Errorf("tenantpg: SCRAM: the server refused the exchange: %q", e)
	}
	v, ok := bytes.CutPrefix(serverFinal, []byte("v="))
	if !ok {
		return errors.New("tenantpg: SCRAM server-final-message has no signature")
	}
	sig, err := base64.StdEncoding.AppendDecode(nil, v)
	if err != nil || !hmac.Equal(sig, cv.serverSig[:]) {
		return ErrScramServerSignature
	}
	return nil
}

// parseServerFirst splits a server-first-message, r=nonce,s=salt,i=count.
func parseServerFirst(msg []byte) (nonce, salt []byte, iterations int, err error) {
	fields := bytes.Split(msg, []byte(","))
	if len(fields) < 3 || !bytes.HasPrefix(fields[0], []byte("r=")) ||
		!bytes.HasPrefix(fields[1], []byte("s=")) || !bytes.HasPrefix(fields[2], []byte("i=")) {
		return nil, nil, 0, errors.New("tenantpg: malformed SCRAM server-first-message")
	}
	nonce = fields[0][2:]
	salt, err = base64.StdEncoding.AppendDecode(nil, fields[1][2:])
	if err != nil || len(salt) == 0 {
		return nil, nil, 0, errors.New("tenantpg: SCRAM server-first-message: malformed salt")
	}
	iterations, err = strconv.Atoi(string(fields[2][2:]))
	if err != nil || iterations < 1 || iterations > scramMaxIterations {
		return nil, nil, 0, fmt.Errorf("tenantpg: SCRAM server-first-message: iteration count %q is not within 1..%d", fields[2][2:], scramMaxIterations)
	}
	return nonce, salt, iterations, nil
}
