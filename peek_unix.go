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
	_ = rc.Read(func(fd uintptr) bool {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		gone = (n == 0 && err == nil) || (n > 0 && buf[0] == 'E')
		return true // never wait for data
	})
	return gone
}
