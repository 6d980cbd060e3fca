package graceful

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// This file holds the connection state machine: the tracker (every
// connection a served listener accepted), the tracked listener and the
// tracked connection, whose one state word decides, without a lock on the
// read path, whether bytes the peer sends are served here, left in the
// socket for the successor, or discarded after our goodbye.
//
// The states and the only transitions allowed (connState.to refuses any
// other):
//
//	fresh   -> seen     Read returned bytes of a request
//	seen    -> fresh    a response began (Write, ReadFrom)
//	fresh   -> claimed  the drain claims an idle plain HTTP/1 connection for the successor
//	claimed -> seen     bytes beat the claim, or net/http reports a buffered (pipelined) request
//	claimed -> handing  Close with no Read in the socket: pass it on
//	handing -> handed   the successor has the descriptor
//	handing -> retired  sending failed: say goodbye instead
//	fresh   -> retired  idle through IdleGrace: FIN, then a read-drain
//	seen    -> retired  expired: during the drain, a request that has not arrived within its bound (a slowloris)
//	retired -> done     the read-drain ended (peer closed, or the linger deadline)
//	fresh, seen -> handing  ServeConns' HandOff, at a message boundary the handler vouches for
//	handing -> seen     HandOff's send failed: the connection stays the handler's
//
// Two flags share the word: reading (a Read is in the socket) and held
// (net/http's background read took a byte of the next request).
//
// The invariants that make the hand-off and the retirement lossless:
//
//  1. "Nothing read since the response began": only a fresh connection may
//     be claimed or retired (a stalled request is expired instead, under
//     invariant 5). Write moves seen back to fresh when the
//     response starts, not when net/http reports the connection idle,
//     because net/http's background read may take the first byte of the
//     next request after the response began. And if that 1-byte read got
//     its byte before the response began (a pipelining client), the held
//     flag keeps the connection seen through the response, until net/http
//     reports the next request active.
//  2. "A claim loses to an arriving byte": a Read that was already in the
//     socket when the claim was made and returns bytes moves claimed back to
//     seen and serves them here. A Read that starts after the claim reads
//     nothing (the bytes stay in the socket for the successor) and reports
//     EOF, so net/http closes the connection and Close passes it on.
//  3. "Close twice, hand off once": net/http may close a connection from
//     two goroutines (Shutdown's idle sweep and the serve loop). The Close
//     that moves claimed to handing sends it; any other Close waits for
//     that send to end before the descriptor is closed. A Close while a Read is in
//     the socket does nothing: the Read returns EOF and net/http closes
//     again.
//  4. A retired connection is never reset: after the FIN, everything the
//     peer still sends is read and discarded until it closes or the linger
//     deadline passes; only then is the descriptor closed.
//  5. "An expiry loses to a complete request": a request that has begun to
//     arrive during the drain is expired (seen -> retired) only while
//     net/http reports the connection idle or new and its reader is blocked
//     in the socket waiting for more; see expireLocked.
type connState int32

const (
	connFresh connState = iota
	connSeen
	connClaimed
	connHanding
	connHanded
	connRetired
	connDone

	// readingBit shares the state word: set while a Read is in the socket.
	readingBit connState = 1 << 4
	// heldBit shares the state word: net/http holds a byte of the next
	// request, read by its 1-byte background read.
	heldBit connState = 1 << 5

	flagBits = readingBit | heldBit
)

var connStateNames = [...]string{"fresh", "seen", "claimed", "handing", "handed", "retired", "done"}

func (s connState) String() string {
	s &^= flagBits
	if int(s) < len(connStateNames) {
		return connStateNames[s]
	}
	return "invalid"
}

// connTransitions is the table above; to consults it.
var connTransitions = [...][]connState{
	connFresh:   {connSeen, connClaimed, connRetired, connHanding},
	connSeen:    {connFresh, connHanding, connRetired},
	connClaimed: {connSeen, connHanding},
	connHanding: {connHanded, connRetired, connSeen},
	connRetired: {connDone},
}

// allowed reports whether the table has from -> to.
func (from connState) allowed(to connState) bool {
	if int(from) >= len(connTransitions) {
		return false
	}
	for _, s := range connTransitions[from] {
		if s == to {
			return true
		}
	}
	return false
}

// lingerTimeout bounds the read-drain of a retired connection: how long,
// after our FIN, we wait for the peer to close before closing ourselves.
const lingerTimeout = 500 * time.Millisecond

// tracker holds every connection accepted through one served listener. It
// is the single place connections are counted; their HTTP state, kept on
// each trackedConn, is guarded by mu.
type tracker struct {
	mu         sync.Mutex
	conns      map[*trackedConn]struct{}
	changed    chan struct{} // closed on the next change; nil while nobody waits
	drainStart time.Time
	draining   atomic.Bool // from startDrain on, Read notes when a request began
	// send, set during a drain with a successor, passes a claimed
	// connection on. handed and kept count what it passed and what it
	// could not pass (those were retired instead).
	send    atomic.Pointer[func(net.Conn) error] // read without mu: a scan holds it long
	handed  atomic.Int64
	kept    atomic.Int64
	expired atomic.Int64 // requests that did not arrive within the drain's bound
	retired atomic.Int64 // idle connections closed cleanly by the drain
	forced  atomic.Int64 // closed at the drain deadline
	key     string       // the listener's address: where the successor serves what it receives
	raw     bool         // ServeConns: its connections may be passed on with HandOff

	// During a probation (probation.go): divert passes new connections to
	// the canary, and with selective only the open ones marked toCanary are
	// claimed (send is set), not every idle one as in a drain.
	divert    atomic.Pointer[diverter]
	selective atomic.Bool

	// testAfterRead, set only by tests, runs between a Read's return from
	// the socket with bytes and its state change, to order a claim against
	// it; b is the Read's buffer.
	testAfterRead func(b []byte)
}

func newTracker(key string) *tracker {
	return &tracker{conns: make(map[*trackedConn]struct{}), key: key}
}

// notifyLocked wakes the waiters of changedLocked. Serving costs nothing
// while nobody waits (only a drain does).
func (t *tracker) notifyLocked() {
	if t.changed != nil {
		close(t.changed)
		t.changed = nil
	}
}

// changedLocked returns a channel closed on the next change.
func (t *tracker) changedLocked() <-chan struct{} {
	if t.changed == nil {
		t.changed = make(chan struct{})
	}
	return t.changed
}

func (t *tracker) add(c net.Conn) *trackedConn {
	tc := &trackedConn{Conn: c, t: t, since: time.Now()}
	t.mu.Lock()
	t.conns[tc] = struct{}{}
	t.notifyLocked()
	t.mu.Unlock()
	return tc
}

func (t *tracker) remove(tc *trackedConn) {
	t.mu.Lock()
	if _, ok := t.conns[tc]; ok {
		delete(t.conns, tc)
		t.notifyLocked()
	}
	t.mu.Unlock()
}

// snapshot returns the open connections.
func (t *tracker) snapshot() []*trackedConn {
	t.mu.Lock()
	defer t.mu.Unlock()
	conns := make([]*trackedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	return conns
}

// setSend starts (or, with nil, stops) passing claimed connections on.
func (t *tracker) setSend(send func(net.Conn) error) {
	if send == nil {
		t.send.Store(nil)
	} else {
		t.send.Store(&send)
	}
}

// unwrap returns the trackedConn under c: c itself, or the connection under
// a *tls.Conn that net/http or its HTTP/2 server reports.
func unwrap(c net.Conn) (*trackedConn, *tls.Conn) {
	var tlsConn *tls.Conn
	if tc, ok := c.(*tls.Conn); ok {
		tlsConn = tc
		c = tc.NetConn()
	}
	tc, _ := c.(*trackedConn)
	return tc, tlsConn
}

// setHTTPState records an http.ConnState change reported by net/http.
func (t *tracker) setHTTPState(c net.Conn, s http.ConnState) {
	tc, tlsConn := unwrap(c)
	if tc == nil || s == http.StateClosed {
		return
	}
	if tlsConn != nil && s != http.StateNew && tlsConn.ConnectionState().NegotiatedProtocol == "h2" {
		// Only the HTTP/2 server reports states after the handshake.
		tc.h2.Store(true)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.conns[tc]; !ok {
		return
	}
	tc.tls = tlsConn
	tc.http = s
	tc.preDrain = false
	if sc, ok := tc.Conn.(*slottedConn); ok {
		// A canary's connection: idle on the board only when nothing of
		// the next request has been read (fresh, no held byte).
		sc.httpState(s, tlsConn == nil && !tc.h2.Load() && connState(tc.word.Load())&^readingBit == connFresh)
	}
	if s == http.StateIdle {
		tc.since = time.Now()
		if tc.state() == connSeen && t.draining.Load() {
			// A byte of the next request is already in (pipelining): its
			// arrival is timed from now, when net/http starts reading it.
			tc.seenAt.Store(tc.since.UnixNano())
		}
	}
	if (s == http.StateIdle || s == http.StateNew) && t.send.Load() != nil {
		if !t.selective.Load() {
			// Claimed before net/http's next read, which then sees EOF. (A
			// new connection during a drain is one our parent handed us
			// late.)
			tc.claimLocked()
		} else if s == http.StateIdle {
			t.chooseLocked(tc)
		}
	}
	if s == http.StateActive {
		tc.setFlag(heldBit, false) // the held byte's request is now active
		if tc.to(connClaimed, connSeen) {
			// A request was already buffered in net/http (pipelining):
			// serve it.
			tc.Conn.SetReadDeadline(time.Time{})
		}
	}
	t.notifyLocked()
}

// chooseLocked decides, during a probation, whether an idle connection
// goes to the canary, once, and claims it if so. Called with t.mu held.
func (t *tracker) chooseLocked(tc *trackedConn) {
	d := t.divert.Load()
	if d == nil || tc.tls != nil || tc.h2.Load() {
		return
	}
	if !tc.chosen {
		tc.chosen, tc.toCanary = true, d.pick()
	}
	if tc.toCanary {
		tc.claimLocked()
	}
}

// startDrain marks the connections whose current response may still offer
// keep-alive: their handlers started before the drain, so the response may
// lack "Connection: close".
func (t *tracker) startDrain() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.drainStart = time.Now()
	t.draining.Store(true)
	for c := range t.conns {
		c.preDrain = c.http == http.StateActive && !c.h2.Load()
	}
	t.notifyLocked()
}

// waitEmpty blocks until no connection is open or ctx ends.
func (t *tracker) waitEmpty(ctx context.Context) error {
	for {
		t.mu.Lock()
		n, ch := len(t.conns), t.changedLocked()
		t.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// closeAll closes every tracked connection and returns how many it closed.
// A connection being sent to the other process is left to its sender (the
// send is bounded by the same deadline): the message being built uses its
// descriptor number.
// live counts the connections a deadline would cut: neither retired (a
// read-drain already counted), nor passed on, nor being passed on.
func (t *tracker) live() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for c := range t.conns {
		switch c.state() {
		case connRetired, connHanding, connHanded, connDone:
		default:
			n++
		}
	}
	return n
}

func (t *tracker) closeAll() int {
	n := 0
	for _, c := range t.snapshot() {
		if c.state() != connHanding {
			c.closeNow()
			n++
		}
	}
	return n
}

// trackedListener adds every accepted connection to its tracker.
type trackedListener struct {
	net.Listener
	t          *tracker
	preTracked bool        // the listener's connections are tracked already (an inbox)
	closed     atomic.Bool // we closed it: Accept's error is the drain, not a failure
	closeOnce  sync.Once
	closeErr   error
}

func (l *trackedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil || l.preTracked {
			return c, err
		}
		d := l.t.divert.Load()
		if d != nil && d.pick() {
			d.divert(l.t.key, c) // during a probation: the canary's
			continue
		}
		tc := l.t.add(c)
		if d != nil {
			l.t.mu.Lock()
			if l.t.divert.Load() == d {
				tc.chosen = true // chosen to stay, as it was accepted
			}
			l.t.mu.Unlock()
		}
		return tc, nil
	}
}

// Close stops accepting. The socket itself stays open in any successor.
func (l *trackedListener) Close() error {
	l.closeOnce.Do(func() {
		l.closed.Store(true)
		l.closeErr = l.Listener.Close()
	})
	return l.closeErr
}

// trackedConn removes itself from its tracker when closed, whoever closes
// it: net/http, a handler that hijacked it, or the drain.
type trackedConn struct {
	net.Conn
	t      *tracker
	word   atomic.Int32 // a connState | flagBits
	h2     atomic.Bool  // HTTP/2: drained by GOAWAY, never retired or claimed
	seenAt atomic.Int64 // during the drain: when the request being read began (UnixNano)

	// The first bytes the peer sent, however they were split, to recognise
	// HTTP/2 with prior knowledge (h2c). Only the reading goroutine uses
	// them.
	preface  [4]byte
	nPreface int

	// Guarded by t.mu.
	http     http.ConnState
	since    time.Time // accepted, or last went idle
	preDrain bool      // active when the drain started: its response may lack "Connection: close"
	tls      *tls.Conn
	toCanary bool // chosen for the canary during a probation: claimed when idle
	chosen   bool // during a probation: toCanary has been decided

	closeOnce sync.Once
	closeErr  error
	handDone  chan struct{} // made by the claim; closed when its send ended
}

// state returns the connection's state, without the reading bit.
func (c *trackedConn) state() connState { return connState(c.word.Load()) &^ flagBits }

// to moves the state from one value to another, keeping the flags. It fails
// if the state is not from or the table has no such transition.
func (c *trackedConn) to(from, next connState) bool {
	if !from.allowed(next) {
		return false
	}
	for {
		v := connState(c.word.Load())
		if v&^flagBits != from {
			return false
		}
		if c.word.CompareAndSwap(int32(v), int32(next|v&flagBits)) {
			return true
		}
	}
}

// beginRead sets the reading bit unless the connection is claimed or
// passed on: those must not consume what the peer sent.
func (c *trackedConn) beginRead() bool {
	for {
		v := connState(c.word.Load())
		if s := v &^ flagBits; s == connClaimed || s == connHanding || s == connHanded {
			return false
		}
		if c.word.CompareAndSwap(int32(v), int32(v|readingBit)) {
			return true
		}
	}
}

func (c *trackedConn) endRead() { c.setFlag(readingBit, false) }

// setFlag sets or clears one of flagBits.
func (c *trackedConn) setFlag(flag connState, on bool) {
	for {
		v := connState(c.word.Load())
		next := v &^ flag
		if on {
			next |= flag
		}
		if v == next || c.word.CompareAndSwap(int32(v), int32(next)) {
			return
		}
	}
}

// responseBegins moves seen to fresh (invariant 1) unless net/http holds a
// byte of the next request.
func (c *trackedConn) responseBegins() {
	for {
		v := connState(c.word.Load())
		if v&^flagBits != connSeen || v&heldBit != 0 {
			return
		}
		if c.word.CompareAndSwap(int32(v), int32(connFresh|v&flagBits)) {
			return
		}
	}
}

// Read hands net/http what the peer sends, except on a retired connection
// (it discards everything until the peer closes, then reports EOF, so no
// request starts after the goodbye and closing sends no RST) and on a
// claimed one (it reads nothing and reports EOF: what the peer sends stays
// in the socket for the successor).
func (c *trackedConn) Read(b []byte) (int, error) {
	if !c.beginRead() {
		return 0, io.EOF
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		if c.t.testAfterRead != nil {
			c.t.testAfterRead(b)
		}
		if len(b) == 1 {
			c.setFlag(heldBit, true) // net/http's background read: invariant 1
		}
		if c.nPreface < len(c.preface) {
			c.nPreface += copy(c.preface[c.nPreface:], b[:n])
			if c.preface == [4]byte{'P', 'R', 'I', ' '} {
				c.h2.Store(true) // HTTP/2 with prior knowledge (h2c)
			}
		}
		if c.to(connFresh, connSeen) {
			c.requestBegins()
		} else if c.state() == connClaimed {
			// Invariant 2: bytes beat the claim. Cancel it and serve them
			// here; undo the claim's deadline under the lock that set it.
			c.t.mu.Lock()
			if c.to(connClaimed, connSeen) {
				c.Conn.SetReadDeadline(time.Time{})
				c.requestBegins()
			}
			c.t.mu.Unlock()
		}
	}
	c.endRead()
	switch c.state() {
	case connRetired:
		for err == nil {
			_, err = c.Conn.Read(b)
		}
		c.to(connRetired, connDone) // the peer closed, or the linger deadline passed
		return 0, io.EOF
	case connClaimed, connHanding, connHanded:
		if n == 0 {
			return 0, io.EOF // woken by the claim's deadline
		}
	}
	return n, err
}

// requestBegins notes, during the drain, when the request now arriving
// began: one that has not arrived within the drain's bound is expired.
func (c *trackedConn) requestBegins() {
	if c.t.draining.Load() {
		c.seenAt.Store(time.Now().UnixNano())
	}
}

// Close closes the connection, except (invariant 3) that a claimed one is
// first passed to the successor, or retired if that fails; and (invariant
// 4) that a retired one still read-draining is closed by the read-drain's
// end or the linger timer instead.
func (c *trackedConn) Close() error {
	sender := false
	for !sender {
		v := connState(c.word.Load())
		if v&^flagBits != connClaimed {
			break
		}
		if v&readingBit != 0 {
			return nil // the Read returns EOF and net/http closes again
		}
		sender = c.word.CompareAndSwap(int32(v), int32(connHanding))
	}
	if sender {
		c.handOff()
	} else if c.state() == connHanding {
		<-c.handDone // another Close is sending it: close only after
	}
	if c.state() == connRetired {
		return nil
	}
	return c.closeNow()
}

// closeNow closes the descriptor, whatever the state.
func (c *trackedConn) closeNow() error {
	c.closeOnce.Do(func() {
		c.closeErr = c.Conn.Close()
		c.t.remove(c)
	})
	return c.closeErr
}

// CloseWrite half-closes the connection when the underlying one can, as
// net/http does before closing after an error response.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Write marks the start of a response (invariant 1): what is read from now
// on belongs to the next request.
func (c *trackedConn) Write(b []byte) (int, error) {
	c.responseBegins()
	return c.Conn.Write(b)
}

// ReadFrom keeps the sendfile/splice path of the underlying connection.
func (c *trackedConn) ReadFrom(r io.Reader) (int64, error) {
	c.responseBegins()
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(c.Conn, r)
}

// claimLocked claims an idle plain HTTP/1 connection for the successor:
// nothing may have been read since its last response began, and a read in
// progress is woken by a deadline in the past. net/http then sees EOF and
// closes it, and Close passes it on. Called with t.mu held.
func (c *trackedConn) claimLocked() bool {
	if c.tls != nil || c.h2.Load() || (c.http != http.StateIdle && c.http != http.StateNew) {
		return false
	}
	if c.state() != connFresh {
		return false // and no Close may be waiting on handDone
	}
	c.handDone = make(chan struct{}) // published by the state change below
	if !c.to(connFresh, connClaimed) {
		return false
	}
	c.Conn.SetReadDeadline(time.Unix(1, 0))
	return true
}

// beginHandOff moves a fresh or seen connection to handing, for HandOff;
// handDone is closed by the caller once the send has ended.
func (c *trackedConn) beginHandOff() bool {
	c.t.mu.Lock() // one claim or hand-off at a time writes handDone
	defer c.t.mu.Unlock()
	for {
		s := c.state()
		if s != connFresh && s != connSeen {
			return false
		}
		c.handDone = make(chan struct{}) // published by the state change below
		if c.to(s, connHanding) {
			return true
		}
	}
}

// handOff passes a claimed connection, now in state handing, to the
// successor. If that fails the connection is retired instead: FIN and a
// read-drain, as without a successor.
func (c *trackedConn) handOff() {
	defer close(c.handDone)
	// A probation's hand-offs are not the drain's: only the drain counts.
	counted := !c.t.selective.Load()
	if send := c.t.send.Load(); send != nil && (*send)(c.Conn) == nil {
		c.to(connHanding, connHanded)
		if counted {
			c.t.handed.Add(1)
		}
		return
	}
	if counted {
		c.t.kept.Add(1)
	}
	c.to(connHanding, connRetired)
	// net/http has stopped reading: the read-drain of invariant 4 is ours.
	c.CloseWrite()
	c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	go func() {
		io.Copy(io.Discard, c.Conn) // ends at the peer's FIN or the deadline
		c.to(connRetired, connDone)
		c.closeNow()
	}()
}

// retire says goodbye to an idle HTTP/1 connection: TLS close_notify, FIN,
// then a read-drain that discards anything the peer still sends, so no
// request starts and the close sends no RST. It does nothing, and returns
// false, if bytes of a request arrived first.
func (c *trackedConn) retire() bool {
	if !c.to(connFresh, connRetired) {
		return false
	}
	c.t.retired.Add(1)
	c.t.mu.Lock()
	tlsConn := c.tls
	c.t.mu.Unlock()
	c.sayGoodbye(tlsConn)
	return true
}

// expireLocked retires a connection whose request has been arriving for
// longer than the drain allows (a client that sent part of a request and
// stalled): it must not hold the drain to its deadline. Invariant 5: an
// expiry loses to a complete request. Only a connection that net/http still
// reports idle or new, whose reader is blocked in the socket waiting for
// more of the request, is expired; one whose last header byte has been read
// (net/http is parsing it, or serving it) is not. Called with t.mu held, so
// that net/http cannot report it active meanwhile; it returns false, doing
// nothing, when the connection does not qualify.
func (c *trackedConn) expireLocked() bool {
	if c.http != http.StateIdle && c.http != http.StateNew {
		return false
	}
	for {
		v := connState(c.word.Load())
		if v&^flagBits != connSeen || v&readingBit == 0 {
			return false
		}
		if c.word.CompareAndSwap(int32(v), int32(connRetired|v&flagBits)) {
			break
		}
	}
	c.sayGoodbye(c.tls)
	return true
}

// sayGoodbye sends the FIN of a retired connection and bounds its
// read-drain: the reader (if any) stops at the deadline, and a timer closes
// the descriptor if no reader is left to.
func (c *trackedConn) sayGoodbye(tlsConn *tls.Conn) {
	if tlsConn != nil {
		tlsConn.CloseWrite()
	}
	c.CloseWrite()
	c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	time.AfterFunc(2*lingerTimeout, func() {
		c.to(connRetired, connDone)
		c.closeNow()
	})
}
