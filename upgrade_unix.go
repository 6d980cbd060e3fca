//go:build unix

package graceful

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"
)

// maxActivated bounds LISTEN_FDS so a corrupt value cannot make us adopt
// arbitrary descriptors.
const maxActivated = 1024

// listenFdsStart is the first descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFdsStart = 3

type platform struct {
	upg        *tableflip.Upgrader
	parentGone chan struct{}
	parentPID  int // the process that started us, when it is our parent

	mu        sync.Mutex
	activated []*activatedSocket // sockets from systemd not yet claimed

	// Idle connections go to the successor over handoffOut; they come from
	// the parent over handoffIn (see handOffConn, receiveHandoffs).
	handoffOut *net.UnixConn
	handoffIn  *net.UnixConn
	received   sync.WaitGroup
}

// handoffName names, among the files passed to a new process, the channel
// on which process pid hands its idle connections to its successor.
func handoffName(pid int) string { return "graceful-handoff-" + strconv.Itoa(pid) }

// newHandoff makes the channel to a future successor: a SOCK_SEQPACKET pair,
// one message per connection (its listener's address, its descriptor). The
// successor's end is passed to every child tableflip starts.
func newHandoff(upg *tableflip.Upgrader) (*net.UnixConn, error) {
	syscall.ForkLock.RLock() // no fork between creating and marking close-on-exec
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, err
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "handoff"), os.NewFile(uintptr(fds[1]), "handoff-successor")
	defer ours.Close()
	defer theirs.Close() // AddFile and FileConn keep duplicates
	if err := upg.Fds.AddFile(handoffName(os.Getpid()), theirs); err != nil {
		return nil, err
	}
	c, err := net.FileConn(ours)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

// inheritHandoff returns the parent's channel, or nil.
func inheritHandoff(upg *tableflip.Upgrader) (*net.UnixConn, error) {
	f, err := upg.Fds.File(handoffName(os.Getppid()))
	if err != nil || f == nil {
		return nil, err
	}
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

type activatedSocket struct {
	name string
	ln   net.Listener   // stream sockets
	pc   net.PacketConn // datagram sockets
}

func (a *activatedSocket) addr() net.Addr {
	if a.ln != nil {
		return a.ln.Addr()
	}
	return a.pc.LocalAddr()
}

func (a *activatedSocket) close() {
	if a.ln != nil {
		a.ln.Close()
	} else {
		a.pc.Close()
	}
}

func (p *Process) initPlatform() error {
	acts, err := takeActivated()
	if err != nil {
		return err
	}
	if err := checkParentPipes(); err != nil {
		for _, a := range acts {
			a.close()
		}
		return err
	}
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: p.opts.UpgradeTimeout})
	if err != nil {
		for _, a := range acts {
			a.close()
		}
		return fmt.Errorf("graceful: %w", err)
	}
	// tableflip's marker variable and its pipes (fds 3 and 4 in a child) are
	// ours alone: a subprocess a handler starts must not inherit them.
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "TABLEFLIP_") {
			os.Unsetenv(k)
		}
	}
	p.plat = platform{upg: upg, activated: acts, parentGone: make(chan struct{})}
	if p.plat.handoffOut, err = newHandoff(upg); err != nil {
		p.log.Warn("no connection hand-off channel; idle connections will be closed at upgrades", "err", err)
	}
	if upg.HasParent() {
		p.plat.parentPID = os.Getppid()
		if p.plat.handoffIn, err = inheritHandoff(upg); err != nil {
			p.log.Warn("cannot use the parent's connection hand-off channel", "err", err)
		}
		unix.CloseOnExec(3)
		unix.CloseOnExec(4)
		go func() {
			// Ends when the parent exits, which its drain deadline bounds.
			err := upg.WaitForParent(context.Background())
			p.log.Info("previous process exited", "err", err)
			close(p.plat.parentGone)
		}()
	} else {
		close(p.plat.parentGone)
	}
	for _, a := range acts {
		p.log.Info("socket activation: received socket", "name", a.name, "addr", a.addr().String())
	}
	return nil
}

func (p *Process) hasParent() bool { return p.plat.upg.HasParent() }

func (p *Process) listen(network, addr string) (net.Listener, error) {
	return p.plat.upg.Fds.ListenWithCallback(network, addr, func(network, addr string) (net.Listener, error) {
		if a := p.plat.claim(network, addr, true); a != nil {
			p.log.Info("socket activation: adopted", "network", network, "addr", addr)
			return a.ln, nil
		}
		return bindStream(network, addr)
	})
}

func (p *Process) listenPacket(network, addr string) (net.PacketConn, error) {
	return p.plat.upg.Fds.ListenPacketWithCallback(network, addr, func(network, addr string) (net.PacketConn, error) {
		if a := p.plat.claim(network, addr, false); a != nil {
			p.log.Info("socket activation: adopted", "network", network, "addr", addr)
			return a.pc, nil
		}
		return bindPacket(network, addr)
	})
}

// claim takes the activated socket whose name or address matches.
func (pl *platform) claim(network, addr string, stream bool) *activatedSocket {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for i, a := range pl.activated {
		if (a.ln != nil) != stream {
			continue
		}
		if a.name == addr || sameAddr(network, addr, a.addr()) {
			pl.activated = append(pl.activated[:i], pl.activated[i+1:]...)
			return a
		}
	}
	return nil
}

func (p *Process) upgradeAllowed() error {
	select {
	case <-p.plat.parentGone:
		return nil
	default:
	}
	if os.Getppid() != p.plat.parentPID {
		// The parent has exited (we were reparented at once) but the
		// goroutine watching it has not run yet: whoever saw the exit and
		// asked for an upgrade must not be refused. It is a moment away.
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-p.plat.parentGone:
			return nil
		case <-t.C:
		}
	}
	return fmt.Errorf("%w: the previous process is still draining", ErrUpgradeInProgress)
}

func (p *Process) upgrade() error {
	for i := 0; ; i++ {
		err := p.plat.upg.Upgrade()
		// tableflip learns of the parent's exit in its own goroutine, a
		// moment after parentGone may close, and refuses meanwhile. It has no
		// sentinel error for that, hence the text.
		if err == nil || i == 100 || !strings.Contains(err.Error(), "parent hasn't exited") {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

func (p *Process) notifyReady() error {
	p.plat.mu.Lock()
	for _, a := range p.plat.activated {
		p.log.Warn("socket activation: socket not claimed by Listen; closing it", "name", a.name, "addr", a.addr().String())
		a.close()
	}
	p.plat.activated = nil
	p.plat.mu.Unlock()
	return p.plat.upg.Ready()
}

func (p *Process) stopPlatform() { p.plat.upg.Stop() }

// waitHandoffs waits until the parent has exited and every connection it
// handed over is delivered (bounded by the parent's drain deadline).
func (p *Process) waitHandoffs() { p.plat.received.Wait() }

// canHandOff reports whether idle connections can go to a successor now.
func (p *Process) canHandOff() bool {
	return p.plat.handoffOut != nil && !p.opts.NoHandOff && p.isUpgraded()
}

// handOffConn sends c's descriptor, and the address of the listener that
// accepted it, to the successor. Our descriptor stays ours to close.
func (p *Process) handOffConn(listener string, c net.Conn) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%T has no descriptor", c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	out := p.plat.handoffOut
	out.SetWriteDeadline(time.Now().Add(time.Second)) // a successor not reading: fall back
	var werr error
	if err := raw.Control(func(fd uintptr) {
		_, _, werr = out.WriteMsgUnix([]byte(listener), unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return err
	}
	return werr
}

// receiveHandoffs serves the connections the parent hands over until it
// exits (EOF) or we stop.
func (p *Process) receiveHandoffs() {
	in := p.plat.handoffIn
	if in == nil {
		p.closeInjectors()
		return
	}
	p.plat.received.Add(1)
	go func() {
		defer p.plat.received.Done()
		defer in.Close()
		defer p.closeInjectors()
		buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4*4))
		for {
			n, oobn, _, _, err := in.ReadMsgUnix(buf, oob)
			if err != nil || n == 0 && oobn == 0 {
				return // the parent exited, or we stop
			}
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				p.log.Warn("connection hand-off: malformed message", "err", err)
				continue
			}
			for _, m := range msgs {
				fds, err := unix.ParseUnixRights(&m)
				if err != nil {
					continue
				}
				for _, fd := range fds {
					f := os.NewFile(uintptr(fd), "handed-off")
					c, err := net.FileConn(f)
					f.Close()
					if err != nil {
						p.log.Warn("connection hand-off: unusable descriptor", "err", err)
						continue
					}
					p.inject(string(buf[:n]), c)
				}
			}
		}
	}()
}

// tableflipSentinel is the variable with which tableflip (v1.2.3) tells a
// child that descriptors 3 and 4 are pipes to its parent.
const tableflipSentinel = "TABLEFLIP_HAS_PARENT_7DIU3"

// checkParentPipes refuses a stray or forged tableflip variable: tableflip
// would read its parent's message from whatever descriptors 3 and 4 are.
func checkParentPipes() error {
	if os.Getenv(tableflipSentinel) == "" {
		return nil
	}
	for _, fd := range []int{3, 4} {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
			return fmt.Errorf("graceful: %s is set but descriptor %d is not a pipe from a parent process; refusing to adopt descriptors (unset the variable)", tableflipSentinel, fd)
		}
	}
	return nil
}

// takeActivated adopts the sockets systemd passed with LISTEN_FDS, after
// checking every variable and descriptor: malformed input is an error and
// adopts nothing. The variables are removed so subprocesses do not see them.
func takeActivated() ([]*activatedSocket, error) {
	pidS, fdsS, namesS := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	if pidS == "" && fdsS == "" {
		return nil, nil
	}
	defer func() {
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_FDNAMES")
	}()
	pid, err := strconv.Atoi(pidS)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("graceful: socket activation: LISTEN_PID=%q is not a process ID", pidS)
	}
	if pid != os.Getpid() {
		return nil, nil // meant for another process
	}
	n, err := strconv.Atoi(fdsS)
	if err != nil || n < 0 || n > maxActivated {
		return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDS=%q is not a count between 0 and %d", fdsS, maxActivated)
	}
	var names []string
	if namesS != "" {
		names = strings.Split(namesS, ":")
		if len(names) != n {
			return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDNAMES has %d names for LISTEN_FDS=%d", len(names), n)
		}
	}
	types := make([]int, n)
	for i := range n {
		fd := listenFdsStart + i
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("graceful: socket activation: LISTEN_FDS=%d but descriptor %d is not open", n, fd)
		}
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d is not a socket: %w", fd, err)
		}
		switch typ {
		case unix.SOCK_STREAM:
			if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc == 0 {
				return nil, fmt.Errorf("graceful: socket activation: descriptor %d is a stream socket that is not listening (Accept=yes is not supported)", fd)
			}
		case unix.SOCK_DGRAM:
		default:
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d has unsupported socket type %d", fd, typ)
		}
		types[i] = typ
	}
	acts := make([]*activatedSocket, 0, n)
	for i, typ := range types {
		fd := listenFdsStart + i
		unix.CloseOnExec(fd)
		a := &activatedSocket{name: "LISTEN_FD_" + strconv.Itoa(fd)}
		if names != nil && names[i] != "" {
			a.name = names[i]
		}
		f := os.NewFile(uintptr(fd), a.name)
		if typ == unix.SOCK_STREAM {
			a.ln, err = net.FileListener(f)
		} else {
			a.pc, err = net.FilePacketConn(f)
		}
		f.Close() // FileListener and FilePacketConn hold their own duplicate
		if err != nil {
			for _, b := range acts {
				b.close()
			}
			return nil, fmt.Errorf("graceful: socket activation: descriptor %d: %w", fd, err)
		}
		acts = append(acts, a)
	}
	return acts, nil
}
