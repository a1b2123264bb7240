import Protocol

/// What flotillad does when a VM's worker ends without being asked to.
public enum RestartPolicy: String, Sendable, CaseIterable {
    case never
    case onFailure = "on-failure"
    case always

    public static let allowedText = "never, on-failure, always"
}

/// One VM of the fleet as stored: the VM in StratoVirt's JSON schema plus the supervisor's
/// fields (`name`, `autostart`, `restart`), all in one document.
public struct VMRecord: Sendable, Equatable {
    /// Supervisor fields that sit beside StratoVirt's schema in the same document.
    public static let supervisorKeys = ["autostart", "restart"]

    public var name: String
    public var autostart: Bool
    public var restart: RestartPolicy
    public var config: VMConfig

    public init(name: String, autostart: Bool = false, restart: RestartPolicy = .onFailure, config: VMConfig) {
        self.name = name
        self.autostart = autostart
        self.restart = restart
        self.config = config
        self.config.name = name
    }

    /// VM names: they become directory names and part of socket paths.
    public static func checkName(_ name: String, field: String = "name") throws(SupervisorError) {
        let allowed = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        let bytes = Array(name.utf8)
        guard (1...64).contains(bytes.count) else { throw .invalid(field, name, allowed) }
        for (index, byte) in bytes.enumerated() {
            let alphanumeric =
                (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
            let punctuation = byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
            guard alphanumeric || (index > 0 && punctuation) else { throw .invalid(field, name, allowed) }
        }
    }

    /// Reads a document: StratoVirt's JSON schema with optional `autostart` and `restart`.
    /// `name`, when given, must agree with the document's own `name` (or supplies it).
    public init(document: JSONValue, name givenName: String?, source: String) throws(SupervisorError) {
        guard var object = document.objectValue else {
            throw SupervisorError(.invalidArgument, "\(source): the VM configuration must be a JSON object, not \(document.typeName)")
        }
        var autostart = false
        if let value = object["autostart"] {
            guard let flag = value.boolValue else {
                throw .invalid("\(source): autostart", value.compactText, "true or false")
            }
            autostart = flag
        }
        var restart = RestartPolicy.onFailure
        if let value = object["restart"] {
            guard let text = value.stringValue, let policy = RestartPolicy(rawValue: text) else {
                throw .invalid("\(source): restart", value.compactText, RestartPolicy.allowedText)
            }
            restart = policy
        }
        for key in Self.supervisorKeys { object[key] = nil }
        let documentName = object["name"]?.stringValue
        guard let name = givenName ?? documentName else {
            throw SupervisorError(.invalidArgument, "\(source): 'name' is missing; give the VM a name")
        }
        try Self.checkName(name, field: givenName == nil ? "\(source): name" : "name")
        if let documentName, documentName != name {
            throw SupervisorError(
                .invalidArgument, "\(source): 'name' '\(documentName)' differs from the VM name '\(name)'; they must agree")
        }
        object["name"] = .string(name)
        let config: VMConfig
        do {
            config = try VMConfig(json: Array(JSONValue.object(object).compactText.utf8), source: source)
        } catch {
            throw SupervisorError(.invalidArgument, "\(source): \(error)")
        }
        if config.serial?.stdio == true {
            throw .invalid("\(source): serial.stdio", "true", "false (a supervised VM has no terminal)")
        }
        if let path = config.serial?.socketPath {
            throw .invalid(
                "\(source): serial.socket_path", path,
                "no socket_path: flotillad serves every VM's console at <runtime-dir>/vms/<name>/console.sock")
        }
        self.init(name: name, autostart: autostart, restart: restart, config: config)
    }

    /// The stored document.
    public var document: JSONValue {
        var object = config.jsonValue.objectValue ?? JSONObject()
        object["name"] = .string(name)
        object["autostart"] = .bool(autostart)
        object["restart"] = .string(restart.rawValue)
        return .object(object)
    }
}
