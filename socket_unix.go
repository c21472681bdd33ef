//go:build unix

package tenantpg

import "syscall"

// peerGone reports, without blocking or consuming anything, whether the
// server has closed the socket or left a message on an idle connection that
// can only be a fatal error ('E': a terminated backend says why before it
// closes). Under TLS only the close is visible.
func (s *trackedConn) peerGone() bool {
	sc, ok := s.Conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	var buf [1]byte
	// Control, not Read: Read takes the socket's read lock, which pgx's
	// background reader can hold in a blocking read of an idle connection,
	// and the peek then waited for it forever, past every deadline.
	// MSG_DONTWAIT makes the peek itself non-blocking, so no lock is needed.
	_ = rc.Control(func(fd uintptr) {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		gone = (n == 0 && err == nil) || (n > 0 && buf[0] == 'E')
	})
	return gone
}
