//go:build unix

package graceful

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// handoff is one end of a hand-off channel (see handoff.go).
type handoff struct {
	conn *net.UnixConn
	log  *slog.Logger
	done chan struct{} // the receive loop ended; nil until receive

	mu      sync.Mutex
	queue   []*outgoing // waiting for a message
	sending bool        // a sender is emptying queue

	// wmu serialises writes, each under its own write deadline: the
	// earlier of deadline (setDeadline: every send from now on) and, if
	// patience is set, that long from the write's start. dmu guards the
	// deadlines and is never held across a write, so that setDeadline
	// never waits behind a blocked one.
	wmu      sync.Mutex
	dmu      sync.Mutex
	deadline time.Time // guarded by dmu
	writing  bool      // a write is in flight (guarded by dmu)
	inFlight time.Time // its deadline (guarded by dmu)
	patience atomic.Int64

	// onControl, if set before receive, is called with each control
	// message (see events.go) the receive loop reads.
	onControl func(msg string)
}

// newHandoffPair makes a hand-off channel: ours, and the other end as a
// file to pass to the other process. Both descriptors are close-on-exec;
// the caller closes theirs once it is passed.
func newHandoffPair(log *slog.Logger) (ours *handoff, theirs *os.File, err error) {
	syscall.ForkLock.RLock() // no fork between creating and marking close-on-exec
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, fmt.Errorf("hand-off socket pair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "handoff")
	defer f.Close() // FileConn keeps a duplicate
	theirs = os.NewFile(uintptr(fds[1]), "handoff-peer")
	ours, err = handoffFromFile(f, log)
	if err != nil {
		theirs.Close()
		return nil, nil, err
	}
	return ours, theirs, nil
}

// handoffFromFile makes a handoff of a channel end passed by another
// process. f stays the caller's to close.
func handoffFromFile(f *os.File, log *slog.Logger) (*handoff, error) {
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("hand-off channel: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("hand-off channel: %T is not a Unix socket", c)
	}
	return &handoff{conn: uc, log: log}, nil
}

// maxBatch is how many descriptors one message carries at most (the
// kernel's SCM_MAX_FD is 253).
const maxBatch = 253

// maxMessage is how long a message's entries may be: the receiver reads
// into a 64 KiB buffer.
const maxMessage = 60 << 10

// outgoing is one connection waiting in send for the message that carries
// it.
type outgoing struct {
	entry string // see handoffEntry
	fd    int    // valid while its sender waits: nothing closes the connection meanwhile
	done  chan error
}

// send passes c's descriptor, and the key of the listener that accepted it,
// to the other end, and returns once it is sent. Our descriptor stays ours
// to close. Concurrent sends are batched, many descriptors to a message: the
// first caller sends for everyone waiting, as a group commit does.
func (h *handoff) send(key string, c net.Conn) error {
	if h == nil {
		return errNoHandoff
	}
	return h.sendEntry(handoffEntry(key, c), c)
}

// sendEntry is send with the entry given (see handoffEntry; a stream's has
// more fields).
func (h *handoff) sendEntry(entry string, c net.Conn) error {
	if h == nil {
		return errNoHandoff
	}
	if s, ok := c.(*slottedConn); ok {
		s.handing() // a canary's connection, handed back: its slot is done
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("hand-off: %T has no descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	out := &outgoing{entry: entry, fd: -1, done: make(chan error, 1)}
	if err := raw.Control(func(fd uintptr) { out.fd = int(fd) }); err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	h.mu.Lock()
	h.queue = append(h.queue, out)
	if !h.sending {
		h.sending = true
		for len(h.queue) > 0 {
			// At most maxBatch descriptors, and entries that fit the
			// receiver's buffer (a stream's carry its state).
			n, bytes := 0, 0
			for n < min(len(h.queue), maxBatch) && (n == 0 || bytes+len(h.queue[n].entry)+1 <= maxMessage) {
				bytes += len(h.queue[n].entry) + 1
				n++
			}
			batch := h.queue[:n]
			h.queue = h.queue[len(batch):]
			h.mu.Unlock()
			err := h.sendEach(batch)
			h.mu.Lock()
			if os.IsTimeout(err) {
				// The other end does not read: those waiting would each
				// wait as long again.
				for _, o := range h.queue {
					o.done <- err
				}
				h.queue = nil
			}
		}
		h.sending = false
		h.queue = nil
	}
	h.mu.Unlock()
	if err := <-out.done; err != nil {
		return fmt.Errorf("hand-off: %w", err)
	}
	return nil
}

// sendEach sends batch in one message and tells each sender the outcome,
// which it returns. If the message is refused for a reason that one
// descriptor may cause (not the deadline, not a peer gone: too many
// descriptors in flight, a bad one), each is sent alone, so that one cannot
// cost the others.
func (h *handoff) sendEach(batch []*outgoing) error {
	err := h.sendBatch(batch)
	if err != nil && len(batch) > 1 && !os.IsTimeout(err) && !errors.Is(err, unix.EPIPE) && !errors.Is(err, unix.ECONNRESET) {
		for _, o := range batch {
			o.done <- h.sendBatch([]*outgoing{o})
		}
		return nil
	}
	for _, o := range batch {
		o.done <- err
	}
	return err
}

// sendBatch sends one message: the entries, NUL-separated, and the
// descriptors in the same order.
func (h *handoff) sendBatch(batch []*outgoing) error {
	var keys []byte
	fds := make([]int, len(batch))
	for i, o := range batch {
		if i > 0 {
			keys = append(keys, 0)
		}
		keys = append(keys, o.entry...)
		fds[i] = o.fd
	}
	return h.write(keys, unix.UnixRights(fds...), time.Duration(h.patience.Load()))
}

// write writes one message, waiting at most within for room (0: until the
// deadline, if any), after the writes before it.
func (h *handoff) write(msg, oob []byte, within time.Duration) error {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	h.dmu.Lock()
	d := h.deadline
	if within > 0 {
		if w := time.Now().Add(within); d.IsZero() || w.Before(d) {
			d = w
		}
	}
	h.writing, h.inFlight = true, d
	h.conn.SetWriteDeadline(d)
	h.dmu.Unlock()
	_, _, err := h.conn.WriteMsgUnix(msg, oob, nil)
	h.dmu.Lock()
	h.writing = false
	h.dmu.Unlock()
	return err
}

// receive starts delivering the connections the other end sends, until it
// closes its end (it exited) or close is called; then it closes our end and
// calls end. Call it at most once; on a nil handoff it calls end at once.
func (h *handoff) receive(deliver func(key string, c net.Conn), end func()) {
	if h == nil {
		end()
		return
	}
	h.done = make(chan struct{})
	go func() {
		defer close(h.done)
		defer end()
		defer h.conn.Close()
		buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4*maxBatch))
		for {
			n, oobn, flags, _, err := h.conn.ReadMsgUnix(buf, oob)
			if err != nil || n == 0 && oobn == 0 {
				return // the other end is gone, or we close
			}
			if n > 0 && buf[0] == 0 && oobn == 0 {
				if h.onControl != nil {
					h.onControl(string(buf[:n]))
				}
				continue
			}
			deliverMessage(h.log, buf[:n], oob[:oobn], flags, deliver)
		}
	}()
}

// deliverMessage delivers the connections one message carries and returns
// how many.
func deliverMessage(log *slog.Logger, msg, oob []byte, flags int, deliver func(key string, c net.Conn)) int {
	keys := strings.Split(string(msg), "\x00")
	if flags&(unix.MSG_CTRUNC|unix.MSG_TRUNC) != 0 {
		// Out of descriptors here (the kernel drops those it cannot
		// install) or a message too long: the connections without a
		// descriptor are lost to both processes.
		log.Error("connection hand-off: message truncated; connections lost", "keys", len(keys), "flags", flags)
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		// Only a kernel bug makes one; its descriptors cannot be found to
		// close.
		log.Error("connection hand-off: malformed message", "err", err)
		return 0
	}
	i, delivered := 0, 0
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			e := ""
			if i < len(keys) {
				e = keys[i]
			}
			i++
			key, c, err := receivedConn(fd, e)
			if err != nil {
				log.Warn("connection hand-off: unusable descriptor", "err", err)
				continue
			}
			deliver(key, c)
			delivered++
		}
	}
	return delivered
}

// receiveQueued delivers, without waiting, the connections queued at f, an
// end of a hand-off channel that nobody reads any more (a new process that
// died or was rolled back did not take them), and discards the control
// messages; it returns how many connections it delivered.
func receiveQueued(f *os.File, deliver func(key string, c net.Conn)) int {
	raw, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4*maxBatch))
	type message struct {
		msg, oob []byte
		flags    int
	}
	var queued []message
	// No fork between receiving descriptors and marking them close-on-exec
	// (MSG_CMSG_CLOEXEC is Linux's alone).
	syscall.ForkLock.RLock()
	raw.Control(func(fd uintptr) {
		for {
			n, oobn, flags, _, err := unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT)
			if err != nil || n == 0 && oobn == 0 {
				return
			}
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					fds, _ := unix.ParseUnixRights(&m)
					for _, fd := range fds {
						unix.CloseOnExec(fd)
					}
				}
			}
			queued = append(queued, message{append([]byte(nil), buf[:n]...), append([]byte(nil), oob[:oobn]...), flags})
		}
	})
	syscall.ForkLock.RUnlock()
	total := 0
	for _, m := range queued {
		if len(m.msg) > 0 && m.msg[0] == 0 {
			// A control message for the process that is gone; the state
			// file's descriptor is closed.
			closeRights(m.oob)
			continue
		}
		if len(m.oob) == 0 {
			continue
		}
		total += deliverMessage(slog.New(slog.DiscardHandler), m.msg, m.oob, m.flags, deliver)
	}
	return total
}

// receivedConn makes a connection of a descriptor received with its entry
// (see handoffEntry). Two system calls (fcntl, epoll_ctl), where net.FileConn
// makes about fifteen (dup, fcntl, getsockopt, getsockname, getpeername,
// setsockopt, ... and close): at thousands of connections a hand-off,
// that is most of its cost. The socket's options (no delay, keep-alive)
// were set by the process that accepted it and travel with the socket.
func receivedConn(fd int, e string) (key string, c net.Conn, err error) {
	parts := strings.Split(e, "\x01")
	key = parts[0]
	if len(parts) == 6 { // a stream: its unread bytes and state ride in the key
		key += "\x01" + parts[4] + "\x01" + parts[5]
	}
	f := os.NewFile(uintptr(fd), "handed-off")
	if len(parts) == 4 || len(parts) == 6 {
		local, lerr := parseAddr(parts[1], parts[2])
		remote, rerr := parseAddr(parts[1], parts[3])
		// A descriptor in blocking mode (none of ours) would get no
		// deadlines: take the slow path for it.
		if lerr == nil && rerr == nil && f.SetDeadline(time.Time{}) == nil {
			return key, &handedConn{f: f, local: local, remote: remote}, nil
		}
	}
	defer f.Close()
	c, err = net.FileConn(f)
	return key, c, err
}

// parseAddr parses an address as net.Addr.String formats it.
func parseAddr(network, s string) (net.Addr, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return nil, err
		}
		return net.TCPAddrFromAddrPort(ap), nil
	case "unix":
		return &net.UnixAddr{Name: s, Net: network}, nil
	}
	return nil, fmt.Errorf("network %q", network)
}

// handedConn is a connection received over the hand-off channel: its
// descriptor as a pollable *os.File, which has the same deadlines and the
// same non-blocking I/O through the runtime poller as a net.Conn, with
// errors shaped as the net package shapes them (net/http tells a timeout
// from a failure by net.Error).
type handedConn struct {
	f             *os.File
	local, remote net.Addr
}

func (c *handedConn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	return n, c.opError("read", err)
}

func (c *handedConn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	return n, c.opError("write", err)
}

func (c *handedConn) Close() error { return c.opError("close", c.f.Close()) }

// CloseWrite shuts down the sending side, as net.TCPConn's does.
func (c *handedConn) CloseWrite() error {
	raw, err := c.f.SyscallConn()
	if err != nil {
		return c.opError("close", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return c.opError("close", err)
	}
	return c.opError("close", serr)
}

func (c *handedConn) LocalAddr() net.Addr  { return c.local }
func (c *handedConn) RemoteAddr() net.Addr { return c.remote }

func (c *handedConn) SetDeadline(t time.Time) error {
	return c.opError("set", c.f.SetDeadline(t))
}

func (c *handedConn) SetReadDeadline(t time.Time) error {
	return c.opError("set", c.f.SetReadDeadline(t))
}

func (c *handedConn) SetWriteDeadline(t time.Time) error {
	return c.opError("set", c.f.SetWriteDeadline(t))
}

// SyscallConn lets the connection be handed on again.
func (c *handedConn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }

// opError shapes err as a net.Conn's: a *net.OpError whose Err is the
// system call's error, net.ErrClosed or the deadline's; io.EOF as is.
func (c *handedConn) opError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if pe, ok := err.(*os.PathError); ok {
		err = pe.Err
		if errno, ok := err.(syscall.Errno); ok {
			err = os.NewSyscallError(pe.Op, errno)
		}
	}
	if errors.Is(err, os.ErrClosed) {
		err = net.ErrClosed
	}
	return &net.OpError{Op: op, Net: c.local.Network(), Source: c.local, Addr: c.remote, Err: err}
}

// ended returns a channel closed once the receive loop has ended; nil (it
// never closes) without one.
func (h *handoff) ended() <-chan struct{} {
	if h == nil {
		return nil
	}
	return h.done
}

// wait blocks until the receive loop has ended and delivered everything.
func (h *handoff) wait() {
	if h != nil && h.done != nil {
		<-h.done
	}
}

// requestDrain asks the other end to drain, as if it had received a drain
// signal.
func (h *handoff) requestDrain() error { return h.sendControl(drainRequest, time.Second) }

// sendControl sends a control message (no descriptor; see events.go),
// after the messages being sent (bounded by their own deadlines), waiting at
// most within for room (0: until the deadline, if any).
func (h *handoff) sendControl(msg string, within time.Duration) error {
	if h == nil {
		return errNoHandoff
	}
	return h.write([]byte(msg), nil, within)
}

// setPatience bounds, when d > 0, how long each send of a connection may
// wait for the other end to read: during a probation, a canary that stalls
// must not hold a client; its connection is served here instead.
func (h *handoff) setPatience(d time.Duration) {
	if h != nil {
		h.patience.Store(int64(d))
	}
}

// controlMsg is a control message, with the file it carried, if any (the
// state file); the receiver closes it.
type controlMsg struct {
	text string
	file *os.File
}

// takeControl returns, without waiting, the control messages that wait at
// our end, oldest first. It stops at a message that carries connections:
// that one is the receive loop's. Call it only while no receive loop runs.
func (h *handoff) takeControl() []controlMsg {
	if h == nil {
		return nil
	}
	raw, err := h.conn.SyscallConn()
	if err != nil {
		return nil
	}
	var msgs []controlMsg
	buf, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4))
	// No fork between receiving a descriptor and marking it close-on-exec.
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	raw.Control(func(fd uintptr) {
		for {
			// A peek of one byte consumes nothing and installs no
			// descriptor (no room for them).
			n, _, err := unix.Recvfrom(int(fd), buf[:1], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if err != nil || n == 0 || buf[0] != 0 {
				return
			}
			n, oobn, _, _, err := unix.Recvmsg(int(fd), buf, oob, unix.MSG_DONTWAIT)
			if err != nil {
				return
			}
			m := controlMsg{text: string(buf[:n])}
			if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					fds, _ := unix.ParseUnixRights(&c)
					for _, fd := range fds {
						unix.CloseOnExec(fd)
						if m.file == nil {
							m.file = os.NewFile(uintptr(fd), "graceful-state")
						} else {
							unix.Close(fd)
						}
					}
				}
			}
			msgs = append(msgs, m)
		}
	})
	return msgs
}

// sendFile sends a control message carrying f's descriptor, waiting at
// most within for room. f stays the caller's to close.
func (h *handoff) sendFile(msg string, f *os.File, within time.Duration) error {
	if h == nil {
		return errNoHandoff
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	if err := raw.Control(func(fd uintptr) { werr = h.write([]byte(msg), unix.UnixRights(int(fd)), within) }); err != nil {
		return err
	}
	return werr
}

// setDeadline bounds every send from now on: a peer that does not read by
// then is given up on, and the connection being sent is retired instead.
// The drain sets its own deadline, so that a successor that stalls for less
// (a long GC pause, a starved CPU) costs no connection.
func (h *handoff) setDeadline(t time.Time) {
	if h == nil {
		return
	}
	h.dmu.Lock()
	defer h.dmu.Unlock()
	h.deadline = t
	if h.writing && !t.IsZero() && (h.inFlight.IsZero() || t.Before(h.inFlight)) {
		h.conn.SetWriteDeadline(t) // the send blocked now is bounded too
		h.inFlight = t
	}
}

// close closes our end; a receive loop ends.
func (h *handoff) close() {
	if h != nil {
		h.conn.Close()
	}
}

// closeRights closes the descriptors a message's control data carries.
func closeRights(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, _ := unix.ParseUnixRights(&m)
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}
